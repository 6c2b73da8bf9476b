"""A draft server that holds its --max-sessions is full, not failed: the target keeps it in rotation, sends it no
session it would refuse, and speculates there again as soon as a session is free."""

import asyncio
import concurrent.futures
import threading

import grpc
import pytest
from splitspec_client import Client

from scrape import METRICS_FLAGS, metric, scrape
from servers import start_draft, start_target, wait_until
from splitspec.models import Vocabulary
from splitspec.protocol import SessionStart
from splitspec.sampling import SamplingParams
from target_server.draft_pool import DraftLinkError, DraftPool

PROMPT = "The quick brown fox"


def test_a_request_waits_for_the_full_drafts_free_session_and_then_speculates(model_dirs, log_dir, reference):
    """One draft session for two requests: the second decodes target-only while the first holds it, then opens it
    mid-generation; the draft never refuses a session, so it stays connected."""
    draft = start_draft(model_dirs["related_draft"], log_dir, "one-session-draft", "--max-sessions", "1")
    target = start_target(model_dirs["target"], log_dir, "target-one-session-draft", [draft.address],
                          "--max-num-seqs", "1",  # each forward one request: the long one outlasts the short one
                          *METRICS_FLAGS)
    try:
        holding = threading.Event()

        def short():
            with Client(target.address, timeout=120) as client:
                chunks = []
                for chunk in client.stream(PROMPT, max_new_tokens=24, ignore_eos=True, num_speculative_tokens=4):
                    chunks.append(chunk)
                    holding.set()
                return [t for c in chunks for t in c.token_ids], chunks[-1].stats

        def long():
            holding.wait(60)
            with Client(target.address, timeout=120) as client:
                # 400 tokens, most of them target-only while the short one holds the session: it outlasts the short
                # one even when the draft, starved of CPU, keeps that one waiting (200 did not, once, under load).
                return client.generate(f"{PROMPT} 1", max_new_tokens=400, ignore_eos=True, num_speculative_tokens=4)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first, second = pool.submit(short), pool.submit(long)
            (short_tokens, short_stats), long_result = first.result(120), second.result(120)
        assert short_tokens == reference(PROMPT, 24) and short_stats.num_drafts > 0
        assert list(long_result.token_ids) == reference(f"{PROMPT} 1", 400)
        # It waited for the session (target-only rounds), then speculated on the draft for the rest.
        assert "holds its most sessions" in long_result.stats.fallback_reason
        assert long_result.stats.num_drafts > 0 and long_result.stats.draft_server == draft.address
        assert long_result.stats.rounds > long_result.stats.num_drafts
        with Client(target.address, timeout=10) as client:
            [status] = client.info().draft_servers
        assert status.connected and not status.error
        assert "RESOURCE_EXHAUSTED" not in draft.log() and "not used" not in target.log()
        # Waiting for a full draft is no draft failure, though the request names the wait in its fallback_reason.
        assert metric(scrape(target), "splitspec:draft_fallback_requests_total") == 0
    finally:
        assert target.stop() == 0
        assert draft.stop() == 0


def test_a_draft_refusing_a_session_as_full_stays_connected_and_is_used_again(model_dirs, log_dir, reference):
    """Two targets share a one-session draft: the second one's session is refused (RESOURCE_EXHAUSTED). Its request
    decodes target-only; the draft stays connected, and once the first target's session ends, the second target's
    requests speculate there again."""
    draft = start_draft(model_dirs["related_draft"], log_dir, "shared-draft", "--max-sessions", "1")
    holder = start_target(model_dirs["target"], log_dir, "target-holding-the-draft", [draft.address])
    other = start_target(model_dirs["target"], log_dir, "target-refused-by-the-draft", [draft.address],
                         "--draft-probe-interval", "1.0", *METRICS_FLAGS)
    try:
        with Client(holder.address, timeout=120) as holding_client, Client(other.address, timeout=60) as client:
            stream = holding_client.stream(PROMPT, max_new_tokens=400, ignore_eos=True)
            next(stream)  # the holder's session is open on the draft
            refused = client.generate(PROMPT, max_new_tokens=32, ignore_eos=True)
            [status] = client.info().draft_servers
            stream.close()
            assert list(refused.token_ids) == reference(PROMPT, 32)
            assert refused.stats.num_drafts == 0 and "holds its most sessions" in refused.stats.fallback_reason
            assert status.connected and not status.error  # full is not failed: no probe needed to bring it back

            def speculates() -> bool:
                result = client.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
                assert list(result.token_ids) == reference(PROMPT, 16)
                return result.stats.num_drafts > 0

            assert wait_until(speculates, 10, interval_s=0.2)
        # A refusal as full is no failure of the draft session.
        assert metric(scrape(other), "splitspec:draft_fallback_requests_total") == 0
    finally:
        assert holder.stop() == 0
        assert other.stop() == 0
        assert draft.stop() == 0


class _Call:
    def __init__(self):
        self.cancelled = False
        self.written = []

    async def write(self, request):
        self.written.append(request)

    async def done_writing(self):
        pass

    async def read(self):
        return grpc.aio.EOF  # the draft ends the call at once after a half-close

    def cancel(self):
        self.cancelled = True


class _Stub:
    def Speculate(self, metadata=None):
        return _Call()


def _pool(max_sessions: int) -> tuple[DraftPool, object, SessionStart]:
    vocabulary = Vocabulary(vocab_size=384, eos_token_ids=(0,), bos_token_id=-1, pad_token_id=-1,
                            tokenizer_fingerprint="")
    pool = DraftPool(["127.0.0.1:1"], vocabulary)
    endpoint = pool.endpoints[0]
    endpoint.stub, endpoint.connected, endpoint.error = _Stub(), True, ""
    endpoint.max_context_tokens, endpoint.max_num_speculative_tokens = 512, 16
    endpoint.max_sessions = max_sessions
    return pool, endpoint, SessionStart([1, 2, 3], SamplingParams(), 4, vocabulary, "r", True)


def test_the_pool_opens_no_more_sessions_than_the_draft_holds():
    async def scenario():
        pool, endpoint, start = _pool(max_sessions=2)
        links = [await pool.open(start, 100), await pool.open(start, 100)]
        with pytest.raises(DraftLinkError) as refused:
            await pool.open(start, 100)
        assert refused.value.full and endpoint.connected
        await links[0].close()
        with pytest.raises(DraftLinkError):  # counted until the draft has ended the call
            await pool.open(start, 100)
        await asyncio.sleep(0.01)
        links.append(await pool.open(start, 100))  # a session ended: its place is free again
        await pool.close()
        return endpoint

    assert asyncio.run(scenario()).live_sessions == 2


def test_a_refusal_as_full_keeps_the_draft_until_a_session_ends_or_a_probe():
    async def scenario():
        pool, endpoint, start = _pool(max_sessions=0)  # a draft that does not say how many it holds
        links = [await pool.open(start, 100) for _ in range(3)]
        pool.report_full(endpoint)  # the fourth was refused (and closed): the draft holds three of ours at most
        with pytest.raises(DraftLinkError) as refused:
            await pool.open(start, 100)
        assert refused.value.full and endpoint.connected and endpoint.consecutive_failures == 0
        await links.pop().close(cancel=True)
        links.append(await pool.open(start, 100))
        pool.report_full(endpoint)
        endpoint.full_at = None  # what a successful probe does: another target's sessions may have ended
        links.append(await pool.open(start, 100))
        await pool.close()

    asyncio.run(scenario())


def test_resource_exhausted_before_the_first_block_is_a_full_draft_and_later_a_failure():
    """The draft refuses a SessionStart with RESOURCE_EXHAUSTED; later in a session the code means a message too
    large, a failure of the session like any other."""
    from splitspec_client.v1 import draft_pb2

    from target_server.draft_pool import DraftLink

    class _RefusingAfter(_Call):
        def __init__(self, blocks: int):
            super().__init__()
            self.blocks = blocks

        async def read(self):
            if self.blocks:
                self.blocks -= 1
                return draft_pb2.SpeculateResponse(block=draft_pb2.CandidateBlock(token_ids=[4], start_position=3))
            raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "draft server is at its limit of 1 sessions")

    async def failure(blocks: int) -> DraftLinkError:
        pool, endpoint, _ = _pool(max_sessions=0)
        link = DraftLink(endpoint, _RefusingAfter(blocks))
        for _ in range(blocks):
            await link.next_block(1.0)
        with pytest.raises(DraftLinkError) as raised:
            await link.next_block(1.0)
        await pool.close()
        return raised.value

    assert asyncio.run(failure(0)).full and not asyncio.run(failure(1)).full
