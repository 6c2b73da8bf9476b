"""Accept/reject of draft tokens: pure functions of tensors, shared vocabulary of splitspec.

One round ("a block") of speculative decoding:
  draft tokens     - the k candidate token ids x_0..x_{k-1} the draft model proposed, each sampled from the draft
                     distribution q_i (or its argmax when greedy).
  target           - one forward of the target model over the k draft tokens gives k+1 rows: row i scores the
                     position of draft token i, row k the position after the last one.
  accepted tokens  - the leading draft tokens the target keeps; their count is `accepted_len` (0..k).
  recovered token  - when draft token i is rejected (accepted_len == i < k), the target's own token for that
                     position, drawn so that the output still follows the target distribution p_i.
  bonus token      - when all k are accepted, the token the target samples from row k, for free.
  next_token_id    - the recovered or the bonus token: every round emits accepted_len + 1 tokens.
  rollback         - KV entries past the accepted prefix are stale on both halves; each crops its cache to
                     `rollback_to` = block start_position + accepted_len leading tokens.

Sampling (temperature > 0) is the speculative sampling of Leviathan et al. 2023 and Chen et al. 2023: accept x_i
with probability min(1, p_i(x_i) / q_i(x_i)), else draw the recovered token from normalize(max(0, p_i - q_i)).
Each emitted token then follows p_i exactly, whatever q is.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verification:
    """The target's verdict on one block of draft tokens."""

    accepted_len: int
    next_token_id: int  # recovered token at the first rejection, or bonus token when all k were accepted


def _first_true(mask: torch.Tensor) -> torch.Tensor:  # mask [k] bool -> index of first True, k if none
    # argmax returns the first maximum; the appended True makes "none" land on k.
    return torch.cat([mask, mask.new_ones(1)]).int().argmax()


def verify_greedy(
    target_logits: torch.Tensor,  # [k+1, vocab_size]
    draft_token_ids: torch.Tensor,  # [k] int64
) -> Verification:
    """Accept while the draft token is the target's argmax; next token is the target's argmax after them."""
    k = draft_token_ids.numel()
    # torch.argmax takes the first index on ties, like generate(do_sample=False). One read from the target's device
    # for the whole block (each read waits for all the device has queued); the comparison is the host's.
    target_token_ids = target_logits.argmax(dim=-1).tolist()  # [k+1]
    drafted = draft_token_ids.tolist()  # [k]
    accepted_len = next((i for i, (target, draft) in enumerate(zip(target_token_ids, drafted)) if target != draft), k)
    return Verification(accepted_len, target_token_ids[accepted_len])


def verify_sampling(
    target_probs: torch.Tensor,  # [k+1, vocab_size] float32, p after logits_to_probs
    draft_probs: torch.Tensor,  # [k, vocab_size] float32, dense q the draft tokens were sampled from
    draft_token_ids: torch.Tensor,  # [k] int64
    generator: torch.Generator,  # on target_probs' device
) -> Verification:
    """Speculative sampling: the emitted tokens follow the target distribution exactly."""
    k = draft_token_ids.numel()
    device = target_probs.device
    draft_token_ids = draft_token_ids.to(device)
    positions = torch.arange(k, device=device)
    p = target_probs[positions, draft_token_ids]  # [k]
    q = draft_probs.to(device)[positions, draft_token_ids]  # [k]
    # One uniform per position, drawn up front so the generator advances the same way whatever is accepted.
    uniform = torch.rand(k, generator=generator, device=device)  # [k]
    # u < p/q, multiplied out: q >= p always accepts, p == 0 always rejects, and q == 0 cannot divide by zero.
    rejected = uniform * q >= p  # [k]
    accepted_len = int(_first_true(rejected))

    if accepted_len == k:
        next_probs = target_probs[k]  # [vocab_size]
    else:
        # Mass where the target wants more than the draft offered; multinomial normalizes it.
        next_probs = (target_probs[accepted_len] - draft_probs[accepted_len].to(device)).clamp_(min=0)
        if not next_probs.sum() > 0:
            # p <= q everywhere only through rounding (a rejection implies p(x) < q(x) somewhere): p is the limit.
            next_probs = target_probs[accepted_len]
    next_token_id = int(torch.multinomial(next_probs, 1, generator=generator).item())
    return Verification(accepted_len, next_token_id)


def expected_tokens_per_round(acceptance_rate: float, k: int) -> float:
    """Tokens emitted per round when each draft token is accepted independently with probability alpha:
    1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)."""
    if not 0 <= acceptance_rate <= 1:
        raise ValueError(f"acceptance_rate must be in [0, 1], got {acceptance_rate}")
    if acceptance_rate == 1:
        return float(k + 1)
    return (1 - acceptance_rate ** (k + 1)) / (1 - acceptance_rate)


def ideal_speedup(acceptance_rate: float, k: int, draft_step_cost: float, verify_cost: float) -> float:
    """Speedup over plain target decoding, ignoring transport: tokens per round over the round's cost, with
    `draft_step_cost` (one draft step) and `verify_cost` (one target forward over k+1 positions) in units of one
    target decoding step."""
    return expected_tokens_per_round(acceptance_rate, k) / (k * draft_step_cost + verify_cost)


def goodput_by_block_size(acceptance_rate: float, max_tokens: int, round_ns) -> list[float]:
    """Expected tokens per nanosecond for each draft length k in 0..max_tokens: E(alpha, k) / round_ns(k), where
    `round_ns(k)` is what a round with a block of k costs and round_ns(0) a target-only step (which emits 1 token).
    The best k is the argmax; 0 means speculation costs more than it brings."""
    return [expected_tokens_per_round(acceptance_rate, k) / round_ns(k) for k in range(max_tokens + 1)]


@dataclass
class DecayedAcceptance:
    """Per-token acceptance alpha of a session's recent blocks: accepted draft tokens over accepted ones plus
    rejections (one per block not accepted whole: the maximum-likelihood alpha), each block's weight decaying by
    `decay` per later block. The goodput schedule (target_server.block_size) and the draft's choice to draft ahead
    (draft_server.engine) each keep one."""

    accepted: float  # weights, from a prior and decayed blocks
    rejected: float
    decay: float

    @classmethod
    def from_prior(cls, acceptance: float, weight: float, decay: float) -> "DecayedAcceptance":
        """Starting at `acceptance`, worth `weight` tokens."""
        return cls(acceptance * weight, (1 - acceptance) * weight, decay)

    def record(self, num_draft_tokens: int, accepted_len: int) -> None:
        self.accepted = self.accepted * self.decay + accepted_len
        self.rejected = self.rejected * self.decay + (accepted_len < num_draft_tokens)

    @property
    def value(self) -> float:
        return self.accepted / (self.accepted + self.rejected)


# The draft drafts a block ahead when the chance that it is used is at least this (draft_ahead_pays); the goodput
# schedule (target_server.block_size) counts on blocks drafted ahead only then.
DRAFT_AHEAD_MIN_CHANCE = 0.2


def chance_drafted_ahead_stands(acceptance_rate: float, k: int) -> float:
    """The chance that a block drafted ahead of the verdict on a block of k draft tokens is used: all k accepted and
    the target's next token the draft's own guess, taken to hold as often as a draft token is accepted:
    alpha^(k+1)."""
    if not 0 <= acceptance_rate <= 1:
        raise ValueError(f"acceptance_rate must be in [0, 1], got {acceptance_rate}")
    return acceptance_rate ** (k + 1)


def draft_ahead_pays(acceptance_rate: float, k: int) -> bool:
    """Whether the draft drafts a block ahead of the verdict on a block of k: when it is likely enough to be used."""
    return chance_drafted_ahead_stands(acceptance_rate, k) >= DRAFT_AHEAD_MIN_CHANCE


def expected_round_ns(verify_ns: float, overhead_ns: float, draft_ns: float, drafted_ahead_chance: float) -> float:
    """A round's expected time: its block's verification, the overhead, and the block's drafting `draft_ns`, which
    is all on the critical path when the block is drafted after the verdict before it, and only in part (what the
    round before did not hide: its verification and overhead) when it was drafted ahead, with
    `drafted_ahead_chance`."""
    exposed_when_ahead = max(0.0, draft_ns - verify_ns - overhead_ns)
    return (verify_ns + overhead_ns + (1 - drafted_ahead_chance) * draft_ns
            + drafted_ahead_chance * exposed_when_ahead)
