"""The target's side of a draft session without servers: which blocks from a draft it refuses (`block_problem`),
which it skips as stale, and when it stops reopening sessions. A scripted link stands in for the gRPC stream."""

import asyncio

import pytest
import torch

from splitspec.models import Vocabulary
from splitspec.protocol import CandidateBlock, SparseDistribution, Verdict
from splitspec.sampling import SamplingParams
from splitspec.speculative import Verification
from target_server.draft_pool import DraftLinkError
from target_server.request import GenerationRequest
from target_server.speculation import Speculation, block_problem

VOCAB_SIZE = 10
VOCABULARY = Vocabulary(VOCAB_SIZE, (2,), 1, 0, "")


def q(ids: list[int], probs: list[float]) -> SparseDistribution:
    return SparseDistribution(torch.tensor(ids, dtype=torch.long), torch.tensor(probs, dtype=torch.float32))


def block(token_ids: list[int], draft_probs=(), start_position: int = 3, preceding_token_id: int = 7,
          block_index: int = 0) -> CandidateBlock:
    return CandidateBlock(block_index, start_position, list(token_ids), list(draft_probs), draft_ns=1000,
                          preceding_token_id=preceding_token_id)


def test_a_good_block_has_no_problem():
    assert block_problem(block([4, 9]), greedy=True, vocab_size=VOCAB_SIZE) is None
    assert block_problem(block([4], [q([4, 9], [0.75, 0.25])]), greedy=False, vocab_size=VOCAB_SIZE) is None


@pytest.mark.parametrize("bad_block, greedy, problem", [
    (block([]), True, "without draft tokens"),
    (block([VOCAB_SIZE]), True, "out of the vocabulary"),  # one past the last id: the target's embedding fails
    (block([-1]), True, "out of the vocabulary"),
    (block([4, 5], [q([4], [1.0])]), False, "1 draft distributions for 2"),
    (block([4], [q([4, 4], [0.5, 0.5])]), False, "repeated"),
    (block([4], [q([4, VOCAB_SIZE], [0.5, 0.5])]), False, "out of the vocabulary"),
    (block([4], [q([4, 5], [0.5, 0.4])]), False, "not a distribution"),  # sums to 0.9
    (block([4], [q([4, 5], [1.5, -0.5])]), False, "not a distribution"),
    (block([4], [q([4, 5], [float("nan"), 1.0])]), False, "not a distribution"),
    (block([4], [q([4, 5], [0.0, 1.0])]), False, "probability 0 under its own"),
    (block([4], [q([5, 6], [0.5, 0.5])]), False, "probability 0 under its own"),  # not in its support at all
])
def test_block_problem_refuses_what_would_break_verification(bad_block, greedy, problem):
    assert problem in block_problem(bad_block, greedy, VOCAB_SIZE)


class ScriptedLink:
    """Hands out the blocks (or DraftLinkErrors) it is given, in order."""

    def __init__(self, script: list):
        self.script = list(script)
        self.address = "draft:1"
        self.endpoint = self.address
        self.closed = False
        self.cancelled = False
        self.verdicts = []

    def block_size(self, num_tokens: int) -> int:
        return num_tokens

    async def send_verdict(self, verdict) -> None:
        self.verdicts.append(verdict)

    async def next_block(self, timeout_s: float) -> CandidateBlock:
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self, cancel: bool = False) -> None:
        self.closed = True
        self.cancelled = cancel


class ScriptedPool:
    """Opens one scripted link per session, in order; records the failures reported."""

    def __init__(self, scripts: list[list]):
        self.scripts = list(scripts)
        self.opened = 0
        self.failures: list[str] = []

    async def open(self, start, total_tokens) -> ScriptedLink:
        self.opened += 1
        script = self.scripts.pop(0)
        if isinstance(script, Exception):  # no session opens
            raise script
        return ScriptedLink(script)

    def report_failure(self, endpoint, reason: str) -> None:
        self.failures.append(reason)


def speculation(pool: ScriptedPool, max_reopens: int) -> Speculation:
    request = GenerationRequest("r", [1, 5, 7], SamplingParams(), max_new_tokens=20, stop=(), ignore_eos=False,
                                num_speculative_tokens=4)
    return Speculation(pool, request, VOCABULARY, timeout_s=1.0, max_reopens=max_reopens, draft_ahead=True)


SEQUENCE = [1, 5, 7]  # a block continuing it starts at 3 after token 7


def test_a_block_for_another_preceding_token_or_start_is_skipped():
    good = block([4, 9])
    pool = ScriptedPool([[block([3], preceding_token_id=8), block([3], start_position=4), good]])
    spec = speculation(pool, max_reopens=0)
    spec.verdicts_sent = 1  # one stale block per verdict (drafted ahead) plus one more is tolerated
    assert asyncio.run(spec.next_block(SEQUENCE, 4)) == good.truncated(4)
    assert spec.stale_blocks == 2 and pool.failures == []


def test_more_stale_blocks_than_drafting_ahead_explains_end_the_session():
    stale = block([3], preceding_token_id=8)
    pool = ScriptedPool([[stale, stale, block([4])]])
    spec = speculation(pool, max_reopens=0)
    # No verdict sent yet: one block drafted ahead may be stale, a second one is a broken draft.
    assert asyncio.run(spec.next_block(SEQUENCE, 4)) is None
    assert len(pool.failures) == 1 and "continue no sequence" in pool.failures[0]
    assert spec.gave_up


@pytest.mark.parametrize("max_reopens", [0, 1, 2])
def test_a_request_reopens_its_draft_session_max_reopens_times(max_reopens):
    failing = [DraftLinkError("draft went away")]
    pool = ScriptedPool([failing] * (max_reopens + 1) + [[block([4])]])
    spec = speculation(pool, max_reopens)
    assert asyncio.run(spec.next_block(SEQUENCE, 4)) is None
    assert pool.opened == max_reopens + 1 and spec.gave_up
    assert "no more draft sessions" in spec.fallback_reason


def test_the_fallback_reason_keeps_a_failed_sessions_cause_when_no_new_session_opens():
    """A draft stalls: its session times out, and by then the pool's probe has found the draft unreachable, so the
    reopen finds no draft. The stall is what the request's fallback_reason names first."""
    pool = ScriptedPool([[DraftLinkError("no block from draft:1 within 1.0s")],
                         DraftLinkError("no draft server connected: draft:1: unreachable: DEADLINE_EXCEEDED")])
    spec = speculation(pool, max_reopens=1)
    assert asyncio.run(spec.next_block(SEQUENCE, 4)) is None
    assert spec.gave_up and pool.opened == 2
    assert spec.fallback_reason == ("no block from draft:1 within 1.0s; "
                                    "then no draft server connected: draft:1: unreachable: DEADLINE_EXCEEDED")


def test_an_invalid_block_ends_the_session_and_a_reopened_one_is_used():
    good = block([4, 9, 6])
    pool = ScriptedPool([[block([VOCAB_SIZE])], [good]])
    spec = speculation(pool, max_reopens=1)
    assert asyncio.run(spec.next_block(SEQUENCE, 2)) == good.truncated(2)
    assert pool.opened == 2 and "out of the vocabulary" in pool.failures[0]
    assert spec.draft_failures == 1  # what draft_fallback_requests counts


def test_a_refusal_as_full_is_no_draft_failure():
    """The draft holds its most sessions: the request reopens later, and draft_fallback_requests does not count it,
    though fallback_reason says why the request went without a draft meanwhile."""
    good = block([4, 9])
    pool = ScriptedPool([[DraftLinkError("draft draft:1: RESOURCE_EXHAUSTED: at its limit", full=True)], [good]])
    pool.report_full = lambda endpoint: pool.failures.append("full")
    spec = speculation(pool, max_reopens=1)
    assert asyncio.run(spec.next_block(SEQUENCE, 2)) == good.truncated(2)
    assert pool.opened == 2 and pool.failures == ["full"]
    assert spec.draft_failures == 0 and "RESOURCE_EXHAUSTED" in spec.fallback_reason


@pytest.mark.parametrize("accepted_len, next_num_tokens", [(0, 4), (2, 3), (3, 0)])
def test_a_verdict_rolls_back_to_the_blocks_start_plus_its_accepted_tokens(accepted_len, next_num_tokens):
    verified = block([4, 9, 6], block_index=5)
    pool = ScriptedPool([[verified]])
    spec = speculation(pool, max_reopens=0)
    assert asyncio.run(spec.next_block(SEQUENCE, 4)) == verified.truncated(4)
    link = spec.link
    asyncio.run(spec.send_verdict(verified, Verification(accepted_len, next_token_id=8), next_num_tokens))
    assert link.verdicts == [Verdict(block_index=5, accepted_len=accepted_len, next_token_id=8,
                                     rollback_to=3 + accepted_len, num_speculative_tokens=next_num_tokens,
                                     num_verified_tokens=3)]
    assert spec.verdicts_sent == 1
    assert (spec.link is None) == (next_num_tokens == 0) and link.closed == (next_num_tokens == 0)


def test_a_session_asked_for_no_block_ends_half_closed():
    """The schedule or the load back-off asks 0 tokens after a verdict that asked for a block: the session ends
    as a finished one does, half-closed (the draft frees it, then ends the call), not cancelled, which would stop it
    counting among the draft's sessions before the draft has freed it."""
    verified = block([4, 9, 6])
    pool = ScriptedPool([[verified]])
    spec = speculation(pool, max_reopens=0)
    assert asyncio.run(spec.next_block(SEQUENCE, 4)) == verified.truncated(4)
    link = spec.link
    asyncio.run(spec.send_verdict(verified, Verification(3, next_token_id=8), next_num_tokens=4))
    assert asyncio.run(spec.next_block(SEQUENCE + [4, 9, 6, 8], 0)) is None
    assert link.closed and not link.cancelled and spec.link is None and pool.opened == 1


def test_draft_fallback_requests_counts_requests_whose_draft_session_failed():
    from prometheus_client import CollectorRegistry

    from splitspec.metrics import TargetMetrics
    from target_server.engine import GenerationStats

    registry = CollectorRegistry()
    metrics = TargetMetrics(registry)
    full = "every draft server that fits the request holds its most sessions"
    metrics.record_finish(GenerationStats(draft_server="draft:1", fallback_reason=full))  # waited, then speculated
    assert registry.get_sample_value("splitspec:draft_fallback_requests_total") == 0
    metrics.record_finish(GenerationStats(draft_server="draft:1", fallback_reason="no block", draft_failures=1))
    assert registry.get_sample_value("splitspec:draft_fallback_requests_total") == 1
