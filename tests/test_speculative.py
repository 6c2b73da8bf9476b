"""Pure math: greedy and sampling verification of draft tokens.

The sampling tests force the target distribution p and the draft distribution q to known values, run many rounds,
and chi-square-test that the emitted tokens follow p. Negative controls run the same check on deliberately wrong
verifiers, so the check is shown able to fail.
"""

import pytest
import torch
from scipy.stats import chisquare

from splitspec.sampling import make_generator, sample
from splitspec.speculative import (
    DRAFT_AHEAD_MIN_CHANCE,
    DecayedAcceptance,
    Verification,
    chance_drafted_ahead_stands,
    draft_ahead_pays,
    expected_round_ns,
    expected_tokens_per_round,
    ideal_speedup,
    verify_greedy,
    verify_sampling,
)

NUM_ROUNDS = 20_000
MIN_P_VALUE = 1e-3

P = torch.tensor([0.10, 0.20, 0.30, 0.15, 0.15, 0.10])
CASES = {
    "q equals p": (P, P),
    "q differs from p": (P, torch.tensor([0.30, 0.30, 0.10, 0.10, 0.10, 0.10])),
    "q zero where p is not": (P, torch.tensor([0.50, 0.00, 0.00, 0.25, 0.25, 0.00])),
    "p zero where q is not": (torch.tensor([0.00, 0.00, 0.50, 0.30, 0.20, 0.00]), torch.full((6,), 1 / 6)),
}


def logits_with_argmax(argmax_ids: list[int], vocab_size: int = 8) -> torch.Tensor:  # [len(argmax_ids), vocab_size]
    logits = torch.randn(len(argmax_ids), vocab_size)
    logits[torch.arange(len(argmax_ids)), argmax_ids] = 10.0
    return logits


def test_greedy_all_accepted_takes_bonus_from_last_row():
    target_logits = logits_with_argmax([3, 1, 4, 2])  # [k+1, vocab_size], k = 3
    assert verify_greedy(target_logits, torch.tensor([3, 1, 4])) == Verification(accepted_len=3, next_token_id=2)


@pytest.mark.parametrize("mismatch_at", [0, 1, 2])
def test_greedy_stops_at_first_mismatch_with_the_targets_token(mismatch_at):
    target_ids = [3, 1, 4, 2]
    draft_ids = target_ids[:3]
    draft_ids[mismatch_at] = 0
    verification = verify_greedy(logits_with_argmax(target_ids), torch.tensor(draft_ids))
    assert verification == Verification(accepted_len=mismatch_at, next_token_id=target_ids[mismatch_at])


def test_greedy_with_no_draft_tokens_is_plain_argmax():
    target_logits = logits_with_argmax([5])  # [1, vocab_size]
    assert verify_greedy(target_logits, torch.empty(0, dtype=torch.long)) == Verification(0, 5)


def test_greedy_ties_take_the_first_index():
    target_logits = torch.tensor([[1.0, 7.0, 7.0], [2.0, 2.0, 0.0]])  # [k+1, vocab_size], k = 1
    assert verify_greedy(target_logits, torch.tensor([2])) == Verification(0, 1)
    assert verify_greedy(target_logits, torch.tensor([1])) == Verification(1, 0)


def p_value(tokens: torch.Tensor, p: torch.Tensor) -> float:  # tokens [n], p [vocab_size]
    """Chi-square goodness of fit of `tokens` to p; a token with p == 0 makes the fit impossible."""
    counts = torch.bincount(tokens, minlength=p.numel())
    support = p > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = p.double()[support] / p.double()[support].sum() * tokens.numel()
    return float(chisquare(counts[support].double().numpy(), expected.numpy()).pvalue)


def run_rounds(verify, target_probs, draft_probs, seed=0):
    """NUM_ROUNDS rounds with fresh draft tokens x_i ~ q_i; returns draft tokens [n, k] and verifications."""
    draft_generator = make_generator(seed + 1)
    draft_token_ids = torch.stack(
        [torch.multinomial(q, NUM_ROUNDS, replacement=True, generator=draft_generator) for q in draft_probs], dim=1
    )  # [n, k]
    generator = make_generator(seed)
    return draft_token_ids, [verify(target_probs, draft_probs, ids, generator) for ids in draft_token_ids]


def first_emitted(verify, p, q) -> tuple[torch.Tensor, torch.Tensor]:  # k = 1: tokens [n], accepted [n]
    bonus_p = torch.full_like(p, 1 / p.numel())
    draft_token_ids, verifications = run_rounds(verify, torch.stack([p, bonus_p]), q[None])
    accepted = torch.tensor([v.accepted_len == 1 for v in verifications])
    recovered = torch.tensor([v.next_token_id for v in verifications])
    return torch.where(accepted, draft_token_ids[:, 0], recovered), accepted


@pytest.mark.parametrize("case", CASES)
def test_sampling_emits_the_target_distribution(case):
    p, q = CASES[case]
    tokens, accepted = first_emitted(verify_sampling, p, q)

    assert p_value(tokens, p) > MIN_P_VALUE
    acceptance_rate = torch.minimum(p, q).sum().item()
    tolerance = 5 * (acceptance_rate * (1 - acceptance_rate) / NUM_ROUNDS) ** 0.5 + 1e-6
    assert accepted.float().mean().item() == pytest.approx(acceptance_rate, abs=tolerance)


def always_accept(target_probs, draft_probs, draft_token_ids, generator):
    k = draft_token_ids.numel()
    return Verification(k, sample(target_probs[k], generator))


def recover_from_p(target_probs, draft_probs, draft_token_ids, generator):
    """Right acceptance test, but the recovered token drawn from p instead of the residual max(0, p - q)."""
    x = int(draft_token_ids[0])
    if torch.rand(1, generator=generator).item() * draft_probs[0, x] < target_probs[0, x]:
        return Verification(1, sample(target_probs[1], generator))
    return Verification(0, sample(target_probs[0], generator))


@pytest.mark.parametrize("wrong_verify", [always_accept, recover_from_p])
def test_the_distribution_check_catches_a_wrong_verifier(wrong_verify):
    p, q = CASES["q differs from p"]
    tokens, _ = first_emitted(wrong_verify, p, q)
    assert p_value(tokens, p) < MIN_P_VALUE


def test_sampling_with_two_draft_tokens_follows_each_target_row():
    target_probs = torch.stack([P, CASES["p zero where q is not"][0], torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5])])
    draft_probs = torch.stack([CASES["q differs from p"][1], torch.full((6,), 1 / 6)])  # [k, vocab_size], k = 2

    draft_token_ids, verifications = run_rounds(verify_sampling, target_probs, draft_probs)

    accepted_len = torch.tensor([v.accepted_len for v in verifications])  # [n]
    next_token_ids = torch.tensor([v.next_token_id for v in verifications])  # [n]
    # Emitted sequence of a round: the accepted draft tokens, then next_token_id.
    first = torch.where(accepted_len >= 1, draft_token_ids[:, 0], next_token_ids)
    second = torch.where(accepted_len >= 2, draft_token_ids[:, 1], next_token_ids)
    assert p_value(first, target_probs[0]) > MIN_P_VALUE
    assert p_value(second[accepted_len >= 1], target_probs[1]) > MIN_P_VALUE
    assert p_value(next_token_ids[accepted_len == 2], target_probs[2]) > MIN_P_VALUE  # bonus tokens


def test_sampling_with_no_draft_tokens_samples_the_bonus_row():
    target_probs = torch.tensor([[0.0, 0.0, 1.0]])  # [k+1, vocab_size], k = 0
    verification = verify_sampling(target_probs, torch.empty(0, 3), torch.empty(0, dtype=torch.long), make_generator(0))
    assert verification == Verification(0, 2)


def test_sampling_falls_back_to_p_when_the_residual_rounds_to_zero():
    # The bonus row puts all its mass where the rejected row has none: a fallback to the wrong row shows.
    target_probs = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])  # [k+1, vocab_size], k = 1
    # q >= p everywhere: only possible through rounding, as q sums to just over 1.
    draft_probs = torch.tensor([[0.5, 0.5, 1e-6]])  # [k, vocab_size]
    generator = make_generator(0)
    verifications = [verify_sampling(target_probs, draft_probs, torch.tensor([2]), generator) for _ in range(20)]
    assert {v.accepted_len for v in verifications} == {0}
    assert {v.next_token_id for v in verifications} == {0, 1}  # drawn from p of the rejected position


def test_a_draft_token_the_target_rules_out_is_rejected_even_at_a_zero_uniform(monkeypatch):
    # torch.rand returns 0.0 with probability 2^-24 per draw: often enough at scale. p(x) == 0 (a token top-k or
    # top-p removed) must still be rejected then, or a token the target can never emit is emitted.
    monkeypatch.setattr(torch, "rand", lambda k, **_: torch.zeros(k))
    target_probs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # [k+1, vocab_size], k = 1
    draft_probs = torch.tensor([[0.5, 0.5, 0.0]])  # [k, vocab_size]
    verification = verify_sampling(target_probs, draft_probs, torch.tensor([0]), make_generator(0))
    assert verification == Verification(accepted_len=0, next_token_id=1)


def test_same_seed_gives_the_same_verifications():
    torch.manual_seed(0)
    target_probs = torch.softmax(torch.randn(50, 4, 32), dim=-1)  # [rounds, k+1, vocab_size], k = 3
    draft_probs = torch.softmax(torch.randn(50, 3, 32), dim=-1)  # [rounds, k, vocab_size]
    draft_token_ids = torch.multinomial(draft_probs.reshape(-1, 32), 1).reshape(50, 3)  # [rounds, k]

    def verify_all(seed):
        generator = make_generator(seed)
        return [verify_sampling(*round_, generator) for round_ in zip(target_probs, draft_probs, draft_token_ids)]

    assert verify_all(42) == verify_all(42)
    assert verify_all(42) != verify_all(43)


def test_expected_tokens_and_ideal_speedup():
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens_per_round(0.999999, 3) == pytest.approx(4.0, rel=1e-5)
    # 1.75 tokens per round for 2 draft steps at 0.1 plus one verification at 1.2 target steps.
    assert ideal_speedup(0.5, 2, draft_step_cost=0.1, verify_cost=1.2) == pytest.approx(1.75 / 1.4)
    with pytest.raises(ValueError, match="acceptance_rate"):
        expected_tokens_per_round(1.5, 2)


def test_a_block_drafted_ahead_stands_when_the_whole_block_and_the_guess_are_accepted():
    assert chance_drafted_ahead_stands(0.9, 4) == pytest.approx(0.9**5)
    assert chance_drafted_ahead_stands(1.0, 8) == 1.0 and chance_drafted_ahead_stands(0.0, 1) == 0.0
    with pytest.raises(ValueError, match="acceptance_rate"):
        chance_drafted_ahead_stands(-0.1, 2)


def test_a_block_is_drafted_ahead_when_its_chance_is_at_least_the_minimum():
    # alpha^(k+1) == 0.2 exactly at alpha = 0.2, k = 0; 0.2^2 = 0.04 at k = 1.
    assert draft_ahead_pays(DRAFT_AHEAD_MIN_CHANCE, 0)
    assert not draft_ahead_pays(DRAFT_AHEAD_MIN_CHANCE, 1)
    assert draft_ahead_pays(1.0, 16) and not draft_ahead_pays(0.0, 0)


def test_decayed_acceptance_decays_accepted_and_rejected_alike():
    estimate = DecayedAcceptance.from_prior(0.5, weight=4.0, decay=0.5)  # 2 accepted, 2 rejected
    assert (estimate.accepted, estimate.rejected) == (2.0, 2.0)
    estimate.record(num_draft_tokens=4, accepted_len=1)  # one accepted, then a rejection
    assert (estimate.accepted, estimate.rejected) == (2.0, 2.0)
    estimate.record(num_draft_tokens=4, accepted_len=4)  # the whole block: no rejection
    assert (estimate.accepted, estimate.rejected) == (5.0, 1.0)
    estimate.record(num_draft_tokens=3, accepted_len=0)
    assert (estimate.accepted, estimate.rejected) == (2.5, 1.5)
    assert estimate.value == pytest.approx(2.5 / 4)
    # Whatever the prior, a long run of blocks at one rate converges to that rate.
    for _ in range(200):
        estimate.record(num_draft_tokens=4, accepted_len=2)
    assert estimate.value == pytest.approx(2 / 3)


def test_a_round_drafted_ahead_shows_only_the_drafting_the_round_before_did_not_hide():
    assert expected_round_ns(30, 2, 20, 0.0) == 52  # drafted after the verdict: all of it
    assert expected_round_ns(30, 2, 20, 1.0) == 32  # drafted ahead, within the 32 the round before took
    assert expected_round_ns(30, 2, 50, 1.0) == 50  # drafted ahead, but longer than that round: 18 show
    assert expected_round_ns(30, 2, 50, 0.5) == pytest.approx(0.5 * 82 + 0.5 * 50)


def test_a_round_emits_its_tokens_up_to_the_first_eos_or_the_length_limit():
    from target_server.engine import round_tokens

    assert round_tokens([5, 6, 7], 0, 10, {2}) == ([5, 6, 7], None)
    assert round_tokens([5, 2, 7], 0, 10, {2}) == ([5, 2], "eos_token")
    assert round_tokens([5, 6, 7], 8, 10, {2}) == ([5, 6], "length")
    assert round_tokens([2, 6, 7], 9, 10, {2}) == ([2], "eos_token")  # eos first when both end the request
    assert round_tokens([5, 6, 7], 7, 10, set()) == ([5, 6, 7], "length")


def test_goodput_by_block_size():
    from splitspec.speculative import goodput_by_block_size

    flat = goodput_by_block_size(0.9, 8, lambda k: 20.0 if k == 0 else 22.0 + k)  # cheap drafts, flat verify
    assert max(range(9), key=flat.__getitem__) == 8
    assert flat[0] == pytest.approx(1 / 20)
    assert flat[4] == pytest.approx(expected_tokens_per_round(0.9, 4) / 26)
    useless = goodput_by_block_size(0.0, 8, lambda k: 20.0 + k)  # a draft never right: any block costs more
    assert max(range(9), key=useless.__getitem__) == 0
