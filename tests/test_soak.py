"""A bounded mixed load (unary and streaming, some cancelled) against both halves: no unexpected error, no leaked
session, bounded memory. The default run is short; `-m slow` runs the two-minute soak."""

import concurrent.futures
import random
import time

import grpc
import pytest
from splitspec_client import Client, SplitspecError
from splitspec_client.v1 import draft_pb2, draft_pb2_grpc

from servers import rss_mb, wait_until

RSS_GROWTH_BOUND_MB = 150


def soak(target, draft, reference, seconds: float, concurrency: int = 4) -> dict:
    prompts = ["The quick brown fox", "def wrap(text):", "Beautiful is better than"]
    expected = {p: reference(p, 24) for p in prompts}
    rss_before = [rss_mb(s.process.pid) for s in (target, draft)]
    deadline = time.monotonic() + seconds
    counts = {"unary": 0, "stream": 0, "cancelled": 0, "errors": 0}

    def worker(seed: int):
        rng = random.Random(seed)
        with Client(target.address, timeout=60) as client:
            while time.monotonic() < deadline:
                prompt = rng.choice(prompts)
                kind = rng.choice(["unary", "stream", "cancelled"])
                try:
                    if kind == "unary":
                        result = client.generate(prompt, max_new_tokens=24, ignore_eos=True,
                                                 num_speculative_tokens=rng.choice([0, 2, 4]))
                        assert list(result.token_ids) == expected[prompt]
                    elif kind == "stream":
                        chunks = list(client.stream(prompt, max_new_tokens=24, ignore_eos=True,
                                                    temperature=rng.choice([0.0, 0.8]), seed=seed))
                        assert sum(len(c.token_ids) for c in chunks) == 24
                    else:
                        stream = client.stream(prompt, max_new_tokens=200, ignore_eos=True)
                        next(stream)
                        stream.close()
                except SplitspecError:
                    counts["errors"] += 1
                    raise
                counts[kind] += 1

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker, i) for i in range(concurrency)]:
            future.result()

    with Client(target.address, timeout=10) as client:
        assert wait_until(lambda: client.info().live_sessions == 0, 2.0)
    with grpc.insecure_channel(draft.address) as channel:
        stub = draft_pb2_grpc.DraftServiceStub(channel)
        assert wait_until(lambda: stub.Info(draft_pb2.DraftInfoRequest(), timeout=5).live_sessions == 0, 2.0)
    for server, before in zip((target, draft), rss_before):
        counts[f"{server.module}_rss_growth_mb"] = round(rss_mb(server.process.pid) - before, 1)
        assert counts[f"{server.module}_rss_growth_mb"] < RSS_GROWTH_BOUND_MB, server.module
    assert counts["errors"] == 0
    counts["sessions_leaked"] = 0  # asserted above: both halves back to zero live sessions
    return counts


def test_short_mixed_load(target_related, related_draft, reference):
    counts = soak(target_related, related_draft, reference, seconds=10)
    assert counts["unary"] and counts["stream"] and counts["cancelled"]


@pytest.mark.slow
def test_two_minute_soak(target_related, related_draft, reference):
    counts = soak(target_related, related_draft, reference, seconds=120)
    print("soak:", counts)
