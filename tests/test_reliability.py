"""Fault injection with real processes: the draft half is an optimisation, its failure never fails a request."""

import asyncio
import concurrent.futures
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from splitspec_client import Client
from splitspec_client.v1 import draft_pb2, draft_pb2_grpc

from servers import start_draft, start_target, wait_until
from target_server.block_size import GoodputSizer

PROMPT = "The quick brown fox"
LONG = 200  # tokens: long enough that a fault lands mid-generation


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def draft_live_sessions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return draft_pb2_grpc.DraftServiceStub(channel).Info(draft_pb2.DraftInfoRequest(), timeout=5).live_sessions


def start_streams(address: str, count: int, prompt: str = PROMPT,
                  max_new_tokens: int = LONG) -> list[concurrent.futures.Future]:
    """`count` concurrent streams, each on a thread of its own; returns once every one has produced a chunk. Each
    future gives its stream's token ids and final stats, or its error."""
    pool = concurrent.futures.ThreadPoolExecutor(count)
    started = [False] * count
    all_started = threading.Barrier(count + 1)

    def run(i):
        with Client(address, timeout=120) as client:
            chunks = []
            for chunk in client.stream(f"{prompt} {i}", max_new_tokens=max_new_tokens, num_speculative_tokens=4,
                                       ignore_eos=True):
                chunks.append(chunk)
                if not started[i]:
                    started[i] = True
                    all_started.wait(30)
            return [t for c in chunks for t in c.token_ids], chunks[-1].stats

    futures = [pool.submit(run, i) for i in range(count)]
    all_started.wait(30)
    pool.shutdown(wait=False)
    return futures


def stream_after_first_chunk(address: str, on_first_chunk, count: int, prompt: str = PROMPT):
    """`count` concurrent streams; `on_first_chunk` runs once every stream has produced a chunk."""
    futures = start_streams(address, count, prompt)
    on_first_chunk()
    return [f.result(timeout=120) for f in futures]


def test_killed_draft_falls_back_then_reconnects(model_dirs, log_dir, reference):
    port = free_port()
    draft = start_draft(model_dirs["related_draft"], log_dir, "killed-draft", "--port", str(port))
    target = start_target(model_dirs["target"], log_dir, "target-killed-draft", [draft.address],
                          "--draft-probe-interval", "0.2", "--draft-max-backoff", "0.5")
    try:
        results = stream_after_first_chunk(target.address, lambda: draft.process.send_signal(signal.SIGKILL), 3)
        for i, (token_ids, stats) in enumerate(results):
            assert token_ids == reference(f"{PROMPT} {i}", LONG)
            assert stats.fallback_reason, "the draft died mid-generation, yet no fallback was recorded"
        draft.stop()

        restarted = start_draft(model_dirs["related_draft"], log_dir, "restarted-draft", "--port", str(port))
        try:
            with Client(target.address, timeout=60) as client:
                assert wait_until(lambda: client.info().draft_servers[0].connected, 20)
                result = client.generate(PROMPT, max_new_tokens=32, ignore_eos=True)
            assert list(result.token_ids) == reference(PROMPT, 32)
            assert result.stats.draft_server == restarted.address and not result.stats.fallback_reason
            assert result.stats.num_drafts > 0
        finally:
            assert restarted.stop() == 0
    finally:
        assert target.stop() == 0


def test_sessions_move_to_a_live_draft(model_dirs, log_dir, reference):
    doomed = start_draft(model_dirs["related_draft"], log_dir, "doomed-draft")
    survivor = start_draft(model_dirs["related_draft"], log_dir, "surviving-draft")
    target = start_target(model_dirs["target"], log_dir, "target-two-drafts-kill", [doomed.address, survivor.address])
    try:
        results = stream_after_first_chunk(target.address, lambda: doomed.process.send_signal(signal.SIGKILL), 4)
        moved = 0
        for i, (token_ids, stats) in enumerate(results):
            assert token_ids == reference(f"{PROMPT} {i}", LONG)
            if doomed.address in stats.fallback_reason:
                assert stats.draft_server == survivor.address  # re-opened on the live draft
                moved += 1
        assert moved >= 1
        with Client(target.address, timeout=10) as client:
            statuses = {s.address: s for s in client.info().draft_servers}
        assert not statuses[doomed.address].connected and statuses[survivor.address].connected
    finally:
        assert target.stop() == 0
        doomed.stop()
        assert survivor.stop() == 0


@pytest.mark.parametrize("case, flags, reason, bound_s", [
    # bounded: one timeout per session, then target-only decoding
    ("timeout", ["--draft-timeout", "1.0"], "no block from {address} within 1.0s", 60),
    # sooner than the 60 s timeout: once a probe (every 0.2 s, 2 s deadline) has failed
    ("probe", ["--draft-timeout", "60", "--draft-probe-interval", "0.2"],
     "draft {address} stopped answering (its probe: unreachable: DEADLINE_EXCEEDED", 30),
], ids=["at-the-draft-timeout", "once-its-probe-fails"])
def test_a_stalled_draft_falls_back(case, flags, reason, bound_s, model_dirs, log_dir, reference):
    """A draft host that stops answering (here SIGSTOP): its sessions wait for their blocks no longer than
    --draft-timeout, nor once the pool's probe of it has failed; the requests finish on the target alone, with the
    same output."""
    draft = start_draft(model_dirs["related_draft"], log_dir, f"stalled-draft-{case}")
    target = start_target(model_dirs["target"], log_dir, f"target-stalled-draft-{case}", [draft.address], *flags)
    try:
        started = time.monotonic()
        results = stream_after_first_chunk(target.address, lambda: draft.process.send_signal(signal.SIGSTOP), 2)
        elapsed = time.monotonic() - started
        for i, (token_ids, stats) in enumerate(results):
            assert token_ids == reference(f"{PROMPT} {i}", LONG)
            assert reason.format(address=draft.address) in stats.fallback_reason, stats.fallback_reason
        assert elapsed < bound_s, elapsed
    finally:
        draft.process.send_signal(signal.SIGCONT)
        assert target.stop() == 0
        assert draft.stop() == 0


def test_a_target_gone_silent_frees_its_sessions_on_the_draft(model_dirs, log_dir):
    """A target host that hangs or is cut off closes no connection: the draft's keepalive pings go unanswered, and
    its sessions end and free their slots within --keepalive-time + --keepalive-timeout (1 s + 1 s here)."""
    draft = start_draft(model_dirs["related_draft"], log_dir, "keepalive-draft", "--keepalive-time", "1",
                        "--keepalive-timeout", "1")
    target = start_target(model_dirs["target"], log_dir, "keepalive-target", [draft.address])
    try:
        start_streams(target.address, 2, max_new_tokens=2 * LONG)  # they fail once the target is killed below
        target.process.send_signal(signal.SIGSTOP)  # its connections stay open; it answers nothing
        assert draft_live_sessions(draft.address) == 2  # waiting for the stopped target's verdicts
        assert wait_until(lambda: draft_live_sessions(draft.address) == 0, 15.0), "the sessions outlived the target"
    finally:
        target.process.kill()
        target.process.send_signal(signal.SIGCONT)
        target.stop(timeout_s=5.0)
        assert draft.stop() == 0


def test_a_client_gone_silent_ends_its_request_on_the_target(model_dirs, log_dir):
    """A client host that hangs or is cut off mid-request: the target's keepalive pings go unanswered, and the
    request ends, freeing its slot, instead of waiting on the client for good. (The request is held up here by a
    stopped draft, whose block the target would wait 60 s for, and whose probes are 1000 s apart.)"""
    draft = start_draft(model_dirs["related_draft"], log_dir, "keepalive-front-draft")
    target = start_target(model_dirs["target"], log_dir, "keepalive-front", [draft.address], "--keepalive-time", "1",
                          "--keepalive-timeout", "1", "--draft-timeout", "60", "--draft-probe-interval", "1000")
    client_code = (f"from splitspec_client import Client\n"
                   f"stream = Client({target.address!r}, timeout=600).stream({PROMPT!r}, max_new_tokens={2 * LONG}, "
                   f"ignore_eos=True)\n"
                   f"next(stream)\n"
                   f"print('streaming', flush=True)\n"
                   f"import time; time.sleep(600)\n")
    client = subprocess.Popen([sys.executable, "-c", client_code], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "streaming"
        draft.process.send_signal(signal.SIGSTOP)  # the request now waits on the draft
        client.send_signal(signal.SIGSTOP)  # its connection stays open; it answers nothing
        with Client(target.address, timeout=10) as observer:
            assert observer.info().live_sessions == 1
            assert wait_until(lambda: observer.info().live_sessions == 0, 15.0), "the request outlived its client"
    finally:
        client.kill()
        client.send_signal(signal.SIGCONT)
        client.wait(10)
        draft.process.send_signal(signal.SIGCONT)
        assert target.stop() == 0
        assert draft.stop() == 0


@pytest.mark.parametrize("call", ["stream", "unary"])
def test_client_cancel_frees_the_session_on_both_halves(target_related, related_draft, call):
    with Client(target_related.address, timeout=60) as client:
        if call == "stream":
            stream = client.stream(PROMPT, max_new_tokens=LONG, ignore_eos=True)
            next(stream)
            assert client.info().live_sessions == 1
            stream.close()  # cancels the RPC
        else:
            with pytest.raises(Exception):
                client.generate(PROMPT, max_new_tokens=LONG, ignore_eos=True, timeout=0.3)
        cancelled_at = time.monotonic()
        assert wait_until(lambda: client.info().live_sessions == 0 and draft_live_sessions(related_draft.address) == 0,
                          1.0), "sessions still live 1 s after the client went away"
        assert time.monotonic() - cancelled_at <= 1.5
        # And the server goes on serving.
        assert client.generate(PROMPT, max_new_tokens=8, ignore_eos=True).stats.generated_tokens == 8


def test_overload_is_refused_at_once_and_admitted_requests_complete(model_dirs, log_dir, reference, related_draft):
    from splitspec_client import ResourceExhaustedError

    target = start_target(model_dirs["target"], log_dir, "target-limited", [related_draft.address],
                          "--max-concurrent-requests", "2", "--max-waiting-requests", "1",
                          "--max-input-tokens", "40", "--max-total-tokens", "300")
    try:
        barrier = threading.Barrier(8)

        def run(i):
            with Client(target.address, timeout=120) as client:
                barrier.wait(30)
                started = time.monotonic()
                try:
                    result = client.generate(f"{PROMPT} {i}", max_new_tokens=LONG, ignore_eos=True)
                    return i, result, None, time.monotonic() - started
                except ResourceExhaustedError as exc:
                    return i, None, exc, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(run, range(8)))
        admitted = [(i, r) for i, r, e, _ in outcomes if r is not None]
        refused = [(e, elapsed) for _, r, e, elapsed in outcomes if e is not None]
        assert len(admitted) >= 3 and len(refused) >= 1 and len(admitted) + len(refused) == 8
        for i, result in admitted:
            assert list(result.token_ids) == reference(f"{PROMPT} {i}", LONG)
        for error, elapsed in refused:
            assert "retry later" in error.details and elapsed < 2.0

        with Client(target.address, timeout=30) as client:
            with pytest.raises(ResourceExhaustedError, match="--max-input-tokens 40"):
                client.generate("word " * 60, max_new_tokens=4)
            with pytest.raises(ResourceExhaustedError, match="--max-total-tokens 300"):
                client.generate(PROMPT, max_new_tokens=299)
            assert client.info().live_sessions == 0
    finally:
        assert target.stop() == 0


def test_goodput_sessions_switching_speculation_off_and_on_leak_nothing(model_dirs, log_dir, reference):
    """The goodput schedule ends and reopens draft sessions as it switches speculation off and probes (the
    unrelated draft: almost never right). Six concurrent requests, two cancelled midway: the others equal the target
    alone, and no session stays open on either half."""
    draft = start_draft(model_dirs["unrelated_draft"], log_dir, "churn-draft")
    target = start_target(model_dirs["target"], log_dir, "churn-target", [draft.address],
                          "--num-speculative-tokens-schedule", "goodput")
    prompts = [f"{PROMPT} {i}" for i in range(6)]
    try:
        def run(i):
            with Client(target.address, timeout=120) as client:
                if i < 2:
                    stream = client.stream(prompts[i], max_new_tokens=LONG, ignore_eos=True, num_speculative_tokens=4)
                    for _ in range(30):
                        next(stream)
                    stream.close()  # cancels the RPC
                    return None
                return client.generate(prompts[i], max_new_tokens=100, ignore_eos=True, num_speculative_tokens=4)

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(run, range(len(prompts))))
        for prompt, result in zip(prompts[2:], results[2:]):
            assert list(result.token_ids) == reference(prompt, 100)
            assert not result.stats.fallback_reason
        # Speculation was switched off for most rounds, and probed again: a session's first blocks, then probes
        # after 16 and 32 target-only rounds, each opening a new draft session.
        for result in results[2:]:
            assert 2 * GoodputSizer.PROBE_BLOCKS < result.stats.num_drafts < result.stats.rounds / 2, result.stats
        with Client(target.address, timeout=10) as client:
            assert wait_until(lambda: client.info().live_sessions == 0 and draft_live_sessions(draft.address) == 0,
                              2.0), "sessions still live after every request ended"
    finally:
        assert target.stop() == 0
        assert draft.stop() == 0


def _pool_with_one_connected_draft():
    """A DraftPool whose one endpoint is marked connected, its stub replaced by `_StuckStub`: the session's first
    write never completes (a draft host gone silent mid-connect)."""
    from splitspec.models import Vocabulary
    from target_server.draft_pool import DraftPool

    vocabulary = Vocabulary(vocab_size=384, eos_token_ids=(0,), bos_token_id=-1, pad_token_id=-1,
                            tokenizer_fingerprint="")
    pool = DraftPool(["127.0.0.1:1"], vocabulary, probe_interval_s=1.0, max_backoff_s=30.0)
    endpoint = pool.endpoints[0]
    endpoint.stub, endpoint.connected, endpoint.error = _StuckStub(), True, ""
    endpoint.max_context_tokens, endpoint.max_num_speculative_tokens = 512, 16
    return pool, endpoint, vocabulary


class _StuckCall:
    def __init__(self):
        self.cancelled = False

    async def write(self, request):
        await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True


class _StuckStub:
    def __init__(self):
        self.calls = []

    def Speculate(self, metadata=None):
        self.calls.append(_StuckCall())
        return self.calls[-1]


def test_a_request_cancelled_while_its_draft_session_opens_leaves_no_session_counted():
    from splitspec.protocol import SessionStart
    from splitspec.sampling import SamplingParams

    async def scenario():
        pool, endpoint, vocabulary = _pool_with_one_connected_draft()
        start = SessionStart([1, 2, 3], SamplingParams(), 4, vocabulary, "cancelled", True)
        opening = asyncio.create_task(pool.open(start, 100))
        await asyncio.sleep(0.05)
        opening.cancel()  # the client's deadline reaches the request while the start message is being sent
        with pytest.raises(asyncio.CancelledError):
            await opening
        await pool.close()
        return endpoint

    endpoint = asyncio.run(scenario())
    assert endpoint.live_sessions == 0 and endpoint.stub.calls[0].cancelled


def test_sessions_failing_together_count_once_towards_the_probe_back_off():
    async def scenario():
        pool, endpoint, _ = _pool_with_one_connected_draft()
        for _ in range(6):  # six sessions on the draft fail at once
            pool.report_failure(endpoint, "stream broken")
        await pool.close()
        return pool, endpoint

    pool, endpoint = asyncio.run(scenario())
    assert not endpoint.connected and endpoint.consecutive_failures == 1
    assert pool._next_probe_delay(endpoint) == 2.0  # the first probe after 2 s, not the 30 s maximum


class _SilentCall:
    """A session on a draft that has stopped answering: what the target writes goes out, no block comes back."""

    def __init__(self):
        self.cancelled = False

    async def write(self, request):
        pass

    async def read(self):
        await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True


class _SilentStub:
    def Speculate(self, metadata=None):
        return _SilentCall()

    async def Info(self, request, timeout=None, metadata=None):
        raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   "Deadline Exceeded")


def test_a_probe_that_finds_the_draft_unreachable_ends_its_sessions_waits_for_blocks():
    from splitspec.protocol import SessionStart
    from splitspec.sampling import SamplingParams
    from target_server.draft_pool import DraftLinkError

    async def scenario():
        pool, endpoint, vocabulary = _pool_with_one_connected_draft()
        endpoint.stub = _SilentStub()
        link = await pool.open(SessionStart([1, 2, 3], SamplingParams(), 4, vocabulary, "silent", True), 100)
        waiting = asyncio.create_task(link.next_block(timeout_s=60))
        await asyncio.sleep(0.05)
        probed = time.monotonic()
        await pool._probe(endpoint)
        with pytest.raises(DraftLinkError, match=r"stopped answering \(its probe: unreachable: DEADLINE_EXCEEDED"):
            await waiting
        waited = time.monotonic() - probed
        with pytest.raises(DraftLinkError, match="stopped answering"):  # a later wait ends at once too
            await link.next_block(timeout_s=60)
        await link.close(cancel=True)
        await pool.close()
        return endpoint, waited

    endpoint, waited = asyncio.run(scenario())
    assert waited < 5, waited
    assert not endpoint.connected and not endpoint.links and endpoint.live_sessions == 0
