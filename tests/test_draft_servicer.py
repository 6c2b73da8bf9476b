"""The draft's Speculate handler, in this process with a scripted engine: the order it reads requests and sends
blocks in when a block drafted ahead and the next verdict race (the model path is covered end to end elsewhere);
and a draft session's choice to draft ahead."""

import asyncio

import pytest
import torch

from draft_server.engine import AHEAD_PRIOR, DraftLimits, DraftSession
from draft_server.servicer import DraftServicer
from splitspec import wire
from splitspec.errors import FailedPrecondition
from splitspec.kv_cache import Sequence
from splitspec.speculative import DRAFT_AHEAD_MIN_CHANCE
from splitspec.models import Vocabulary
from splitspec.protocol import CandidateBlock, SessionStart, Verdict
from splitspec.sampling import SamplingParams
from splitspec_client.v1 import draft_pb2

VOCABULARY = Vocabulary(vocab_size=16, eos_token_ids=(), bos_token_id=-1, pad_token_id=-1, tokenizer_fingerprint="")


def _block(index: int, start: int, ahead: bool) -> CandidateBlock:
    return CandidateBlock(index, start, [1, 2], [], 0, 3, ahead)


class _Session:
    draft_ahead = True
    pending_verdict = None

    def keeps_ahead_block(self, verdict: Verdict) -> bool:
        return verdict.accepted_len == 2


class _ScriptedEngine:
    """Block 0 at start; a block drafted ahead as soon as asked (or when `ahead_gate` opens); `step` drafts anew."""

    def __init__(self, ahead_gate: asyncio.Event | None = None):
        self.session = _Session()
        self.ahead_gate = ahead_gate
        self.events: list[str] = []
        self.closed = False

    async def start_session(self, start):
        self.events.append("start")
        return self.session, _block(0, 5, False)

    async def draft_ahead(self, session, num_tokens):
        if self.ahead_gate is not None:
            await self.ahead_gate.wait()
        self.events.append("ahead")
        return _block(1, 8, True)

    async def step(self, session, verdict):
        self.events.append(f"step {verdict.block_index}")
        return None if verdict.accepted_len == 2 else _block(9, 6, False)

    def close_session(self, session):
        self.closed = True


def _start() -> draft_pb2.SpeculateRequest:
    start = SessionStart([1, 2, 3], SamplingParams(), 2, VOCABULARY, "r", draft_ahead=True)
    return draft_pb2.SpeculateRequest(start=wire.session_start_to_pb(start))


def _verdict(block_index: int, accepted_len: int, num_tokens: int = 2) -> draft_pb2.SpeculateRequest:
    verdict = Verdict(block_index, accepted_len, 4, 5 + accepted_len, num_tokens)
    return draft_pb2.SpeculateRequest(verdict=wire.verdict_to_pb(verdict))


async def _run(engine, requests, verdict_gate: asyncio.Event):
    async def request_iterator():
        yield requests[0]
        await verdict_gate.wait()  # the target is still verifying block 0
        for request in requests[1:]:
            yield request

    servicer = DraftServicer(engine, description=None)
    sent = []
    async for response in servicer.Speculate(request_iterator(), context=None):
        block = response.block
        sent.append((block.block_index, block.drafted_ahead))
        if len(sent) == 2 or (block.block_index == 0 and engine.ahead_gate is not None):
            verdict_gate.set()
    return sent


def test_a_block_drafted_ahead_goes_out_before_the_verdict_arrives_and_the_verdict_is_read_after():
    async def scenario():
        engine = _ScriptedEngine()
        sent = await _run(engine, [_start(), _verdict(0, 2, 0)], asyncio.Event())
        return engine, sent

    engine, sent = asyncio.run(scenario())
    # Block 1 (drafted ahead) was sent while the verdict on block 0 was still unread; the full acceptance kept it.
    assert sent == [(0, False), (1, True)]
    assert engine.events == ["start", "ahead", "step 0"] and engine.closed


def test_a_verdict_that_arrives_while_drafting_ahead_waits_for_that_block():
    async def scenario():
        gate = asyncio.Event()
        engine = _ScriptedEngine(ahead_gate=gate)
        verdict_gate = asyncio.Event()
        task = asyncio.ensure_future(_run(engine, [_start(), _verdict(0, 1, 0)], verdict_gate))
        await asyncio.sleep(0.05)  # the verdict (a rejection) is in while block 1 is still being drafted
        gate.set()
        return engine, await task

    engine, sent = asyncio.run(scenario())
    # The rejected guess drops block 1 unsent; the step drafts the replacement.
    assert sent == [(0, False), (9, False)]
    assert engine.events == ["start", "ahead", "step 0"] and engine.closed
    assert engine.session.pending_verdict is not None


def test_the_draft_drafts_ahead_while_its_blocks_are_accepted_and_stops_when_they_are_not():
    class Tokens(Sequence):  # token ids only: the decision needs no model
        cached_len = 0

        def truncate_cache(self, length):
            pass

    start = SessionStart([1, 2, 3], SamplingParams(), 4, VOCABULARY, "r", draft_ahead=True)
    session = DraftSession(1, start, Tokens([1, 2, 3]), DraftLimits(8, 1024, 16, 4), torch.device("cpu"))
    assert not session.drafting_ahead_pays()  # no block is open: nothing to draft ahead of

    def round_with(accepted_len: int) -> bool:
        """Open a block of 4, answer it with `accepted_len` accepted; whether the next block is drafted ahead."""
        position = len(session.sequence.token_ids)
        session.open_blocks.append(CandidateBlock(session.next_block_index, position, [7, 7, 7, 7], [], 0, 3))
        session.sequence.token_ids += [7, 7, 7, 7]
        verdict = Verdict(session.next_block_index, accepted_len, 9, position + accepted_len, 4)
        session.apply_verdict(verdict, VOCABULARY.vocab_size)
        session.next_block_index += 1
        session.open_blocks.append(CandidateBlock(session.next_block_index, position, [7, 7, 7, 7], [], 0, 3))
        pays = session.drafting_ahead_pays()
        session.open_blocks.clear()
        return pays

    session.open_blocks.append(CandidateBlock(0, 3, [7] * 8, [], 0, 3))
    assert session.drafting_ahead_pays()  # before any verdict: drafted ahead of, even a block of 8
    session.open_blocks.clear()
    assert DRAFT_AHEAD_MIN_CHANCE > 0.8**9  # ...which after one would take more than the prior 0.8 per token
    assert [round_with(0) for _ in range(3)][-1] is False  # rejections at the first token switch it off...
    assert [round_with(4) for _ in range(6)][-1] is True  # ...and whole blocks accepted switch it on again
    assert round_with(3)  # one rejection late in a block does not
    assert 0.7 < session.acceptance.value < 1


def test_a_block_the_target_cut_short_and_accepted_whole_counts_as_no_rejection():
    class Tokens(Sequence):
        cached_len = 0

        def truncate_cache(self, length):
            pass

    def acceptance_after(num_verified_tokens: int | None, accepted_len: int) -> float:
        start = SessionStart([1, 2, 3], SamplingParams(), 4, VOCABULARY, "r", draft_ahead=True)
        session = DraftSession(1, start, Tokens([1, 2, 3]), DraftLimits(8, 1024, 16, 4), torch.device("cpu"))
        for index in range(4):
            position = len(session.sequence.token_ids)
            session.open_blocks.append(CandidateBlock(index, position, [7, 7, 7, 7], [], 0, 3))
            session.sequence.token_ids += [7, 7, 7, 7]
            verdict = Verdict(index, accepted_len, 9, position + accepted_len, 4, num_verified_tokens)
            session.apply_verdict(wire.verdict_from_pb(wire.verdict_to_pb(verdict)), VOCABULARY.vocab_size)
            session.next_block_index += 1
        return session.acceptance.value

    prior_acceptance = AHEAD_PRIOR[0] / sum(AHEAD_PRIOR)
    # The target verified 2 of each block's 4 tokens (its k went down) and accepted both: no rejection, the estimate
    # rises as for blocks accepted whole.
    assert acceptance_after(2, 2) > prior_acceptance
    assert acceptance_after(4, 2) == acceptance_after(None, 2)  # 4 verified of 4: the whole block
    # Without the field (an older target), the same verdicts read as a rejection after 2 tokens each.
    assert acceptance_after(None, 2) < prior_acceptance
    assert acceptance_after(None, 4) > prior_acceptance


def test_a_block_drafted_ahead_that_stands_near_the_end_of_the_context_is_no_error():
    """Context 64: blocks of 4 drafted ahead up to the last position. The verdict's next block size counts from the
    verdict's token (position rollback_to), not from the end of the blocks already drafted ahead after it."""
    class Tokens(Sequence):
        cached_len = 0

        def truncate_cache(self, length):
            pass

    start = SessionStart(list(range(50)), SamplingParams(), 4, VOCABULARY, "r", draft_ahead=True)
    session = DraftSession(1, start, Tokens(list(range(50))), DraftLimits(8, 64, 16, 4), torch.device("cpu"))

    def open_block(guess: int | None) -> CandidateBlock:
        if guess is not None:  # drafted ahead: the guess of the target's token first
            session.ahead_guess = guess
            session.sequence.token_ids.append(guess)
        block = CandidateBlock(session.next_block_index, len(session.sequence.token_ids), [7] * 4, [], 0, 3,
                               guess is not None)
        session.sequence.token_ids += block.token_ids
        session.open_blocks.append(block)
        session.next_block_index += 1
        return block

    first, ahead = open_block(None), open_block(9)  # positions 50-53; guess 54, 55-58
    assert session.apply_verdict(Verdict(first.block_index, 4, 9, 54, 4), VOCABULARY.vocab_size)
    open_block(9)  # guess 59, positions 60-63: the context is full
    assert len(session.sequence.token_ids) == 64
    # The target is at 59 + its token = 60 tokens: a next block of 3 or 4 fits; 5 does not.
    assert session.apply_verdict(Verdict(ahead.block_index, 4, 9, 59, 4), VOCABULARY.vocab_size)
    session.open_blocks.clear()
    session.open_blocks.append(CandidateBlock(session.next_block_index, 60, [7] * 4, [], 0, 3))
    session.sequence.token_ids[60:] = [7] * 4
    with pytest.raises(FailedPrecondition, match="5 draft tokens do not fit"):
        session.apply_verdict(Verdict(session.next_block_index, 0, 9, 60, 5), VOCABULARY.vocab_size)
