"""Speculative sampling past the first token: the joint distribution of the first five sampled tokens, through the
target's whole decoding loop and a real draft (the offline LLM's in-process draft server), equals the target's own.

test_sampling_end_to_end checks the first token, one draft token in one round. These check the paths later rounds
take: a block drafted ahead on a guessed bonus token and used, a block drafted ahead cut shorter by the target (the
last round's room), a rejected block followed by a redrafted one at the same positions, and a draft that fails
mid-request (the target reopens a session on the sequence so far, then goes on alone). Each is exact only if every
draft token still follows the q it is tested against, whatever the target decided before.
"""

import collections

import pytest
import torch
from scipy import stats

import draft_server.engine
import target_server.engine
from splitspec import LLM, SamplingParams
from splitspec.sampling import SamplingParams as EngineSampling, logits_to_probs
from splitspec.speculative import Verification
from target_server.draft_pool import DraftLink, DraftLinkError, DraftPool

# A prompt after which the related draft's first block is often accepted whole and its guess of the next token right
# (about a quarter of requests use the block it drafted ahead); after most prompts its top two and the target's part.
PROMPT_IDS = [347, 66, 76, 19, 41]
TOP_K = 2  # two candidates per position: 2^5 sequences of five tokens, few enough to test their joint distribution
NUM_TOKENS = 5
DRAWS = 1500
CONTROL_DRAWS = 500  # the negative controls' distributions are far off: fewer draws tell them apart
MIN_P_VALUE = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def target_joint(reference, prompt_ids: list[int]) -> dict[tuple[int, ...], float]:
    """The target's probability of each sequence of NUM_TOKENS tokens after the prompt, by enumeration."""
    params = EngineSampling(temperature=1.0, top_k=TOP_K)
    joint = {(): 1.0}
    for _ in range(NUM_TOKENS):
        longer = {}
        for prefix, prob in joint.items():
            with torch.no_grad():
                logits = reference.model(torch.tensor([prompt_ids + list(prefix)])).logits[0, -1]
            p = logits_to_probs(logits, params)
            for token_id in torch.nonzero(p > 0).squeeze(-1).tolist():
                longer[prefix + (token_id,)] = prob * float(p[token_id])
        joint = longer
    return joint


def joint_p_value(samples: list[tuple[int, ...]], joint: dict[tuple[int, ...], float]) -> float:
    """Chi-square of the sampled sequences against `joint`; sequences expected fewer than 5 times are pooled. 0 when
    a sequence the target cannot emit was sampled."""
    counts = collections.Counter(samples)
    if not set(counts) <= set(joint):
        return 0.0
    observed, expected, pooled_observed, pooled_expected = [], [], 0, 0.0
    for sequence, prob in joint.items():
        if prob * len(samples) >= 5:
            observed.append(counts[sequence])
            expected.append(prob * len(samples))
        else:
            pooled_observed += counts[sequence]
            pooled_expected += prob * len(samples)
    if pooled_expected:
        observed.append(pooled_observed)
        expected.append(pooled_expected)
    # The enumerated probabilities sum to 1 only up to float rounding, which chisquare checks to 1e-8.
    expected = [e * len(samples) / sum(expected) for e in expected]
    return stats.chisquare(observed, expected).pvalue


class RoundLog:
    """Wraps the target's verification to record the kind of each block it verified."""

    def __init__(self, monkeypatch):
        self.kinds = collections.Counter()
        verify = target_server.engine.finish_verification

        def recording(sequence, block, sampling, generator, logits) -> Verification:
            verification = verify(sequence, block, sampling, generator, logits)
            if block is None:
                self.kinds["target alone"] += 1
            else:
                self.kinds["drafted ahead"] += block.drafted_ahead
                self.kinds["truncated"] += len(block.token_ids) < block.num_drafted
                self.kinds["rejection"] += verification.accepted_len < len(block.token_ids)
            return verification

        monkeypatch.setattr(target_server.engine, "finish_verification", recording)


def sample_sequences(model_dirs, reference, draft: str, num_speculative_tokens: int,
                     draws: int = DRAWS) -> list[tuple[int, ...]]:
    params = [SamplingParams(temperature=1.0, top_k=TOP_K, seed=seed, max_tokens=NUM_TOKENS, ignore_eos=True)
              for seed in range(draws)]
    with LLM(model=model_dirs["target"], speculative_model=model_dirs[draft],
             num_speculative_tokens=num_speculative_tokens, max_num_seqs=16) as llm:
        outputs = llm.generate([PROMPT_IDS] * draws, params)
    return [tuple(output.outputs[0].token_ids) for output in outputs]


@pytest.mark.parametrize("draft", ["target", "related_draft"])
def test_the_first_tokens_follow_the_target_distribution_through_every_kind_of_block(model_dirs, reference, draft,
                                                                                      monkeypatch):
    # k = 2 and five tokens: block 0 covers tokens 0-1 and the draft drafts block 1 ahead on its guess of token 2
    # (tokens 3-4); when that stands, only one token is left to verify, so the target cuts block 1 to one token.
    rounds = RoundLog(monkeypatch)
    samples = sample_sequences(model_dirs, reference, draft, num_speculative_tokens=2)
    assert joint_p_value(samples, target_joint(reference, PROMPT_IDS)) > MIN_P_VALUE
    assert rounds.kinds["drafted ahead"] > DRAWS / 20 and rounds.kinds["truncated"] > DRAWS / 20, rounds.kinds
    if draft == "related_draft":
        assert rounds.kinds["rejection"] > DRAWS / 5, rounds.kinds


def test_the_first_tokens_follow_the_target_distribution_when_the_draft_fails_midway(model_dirs, reference,
                                                                                    monkeypatch):
    """Every draft session fails at its second block: the target reopens one on the sequence so far (the same
    seed, later positions), twice, then decodes alone."""
    read = DraftLink.next_block
    failures = []

    async def failing_at_the_second_block(self, timeout_s):
        self.blocks_read = getattr(self, "blocks_read", 0) + 1
        if self.blocks_read == 2:
            failures.append(self.address)
            raise DraftLinkError("the draft died")
        return await read(self, timeout_s)

    monkeypatch.setattr(DraftLink, "next_block", failing_at_the_second_block)
    # The draft stays in rotation: each request goes through its reopens rather than all but the first going alone.
    monkeypatch.setattr(DraftPool, "report_failure", lambda self, endpoint, reason: None)
    rounds = RoundLog(monkeypatch)
    samples = sample_sequences(model_dirs, reference, "related_draft", num_speculative_tokens=1)
    assert joint_p_value(samples, target_joint(reference, PROMPT_IDS)) > MIN_P_VALUE
    assert len(failures) > DRAWS and rounds.kinds["rejection"] > DRAWS / 5, (len(failures), rounds.kinds)


def test_the_joint_check_catches_draft_tokens_accepted_without_their_test(model_dirs, reference, monkeypatch):
    """The negative control: a target that keeps every draft token emits the draft's distribution, which the
    check must tell from the target's."""

    def always_accept(target_probs, draft_probs, draft_token_ids, generator):
        k = draft_token_ids.numel()
        return Verification(k, int(torch.multinomial(target_probs[k], 1, generator=generator)))

    monkeypatch.setattr(target_server.engine, "verify_sampling", always_accept)
    samples = sample_sequences(model_dirs, reference, "related_draft", num_speculative_tokens=2, draws=CONTROL_DRAWS)
    assert joint_p_value(samples, target_joint(reference, PROMPT_IDS)) < MIN_P_VALUE


def test_the_joint_check_catches_a_draft_that_reuses_its_randomness(model_dirs, reference, monkeypatch):
    """The negative control for randomness judged twice: a draft that seeds every position's draw alike reuses the
    randomness of tokens the target already judged, so its next tokens are not drawn from the q they are tested
    against, given what came before."""
    # The draft seeds position j's draw from hash((seed, j)): made constant, every position draws alike.
    monkeypatch.setattr(draft_server.engine, "hash", lambda seed_and_position: 12345, raising=False)
    samples = sample_sequences(model_dirs, reference, "related_draft", num_speculative_tokens=2, draws=CONTROL_DRAWS)
    assert joint_p_value(samples, target_joint(reference, PROMPT_IDS)) < MIN_P_VALUE
