"""Hostile input to every RPC of both servers: each message gets a clean status, nothing crashes, memory stays
bounded, and the next valid request is answered correctly. `-m slow` runs the large version."""

import math
import random

import grpc
import pytest
from splitspec_client import Client
from splitspec_client.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2

from servers import rss_mb
from tiny_models import VOCAB_SIZE

# What a hostile message may legitimately get back. UNKNOWN, INTERNAL or a dead server would be a defect.
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.RESOURCE_EXHAUSTED}
RSS_GROWTH_BOUND_MB = 150
identity = lambda data: data  # noqa: E731 - raw bytes on the wire


def random_bytes(rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 3, 17, 100, 1000])))


def hostile_float(rng: random.Random) -> float:
    return rng.choice([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-30, 1e30, 0.5, 2.0])


def hostile_generate_request(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # invalid UTF-8 in a string field (prompt, then stop)
        field = rng.choice([b"\x0a", b"\x2a"])
        payload = b"\xff\xfe\xc3\x28"
        return field + bytes([len(payload)]) + payload
    if kind == 1:  # a huge repeated field
        return target_pb2.GenerateRequest(prompt_token_ids=[rng.randrange(VOCAB_SIZE)] * 200_000).SerializeToString()
    request = target_pb2.GenerateRequest(
        prompt_token_ids=[rng.choice([-5, 0, 7, VOCAB_SIZE, 2**31 - 1]) for _ in range(rng.randrange(1, 5))],
        sampling=common_pb2.SamplingParams(temperature=hostile_float(rng), top_k=rng.choice([-3, 0, 5, 2**31 - 1]),
                                           top_p=hostile_float(rng)),
        max_new_tokens=rng.choice([-1, 0, 1, 3, 2**31 - 1]),
        num_speculative_tokens=rng.choice([-1, 0, 3, 1000]),
        stop=rng.choice([[], [""], ["x" * 10_000], ["a"] * 100]),
    )
    if kind == 2:
        request.ClearField("prompt_token_ids")
        request.prompt = rng.choice(["", "hi", "\u0000\ud7ff", "x" * 20_000])
    return request.SerializeToString()


def hostile_speculate_stream(rng: random.Random, vocabulary) -> list[bytes]:
    def start():
        return draft_pb2.SpeculateRequest(start=draft_pb2.SessionStart(
            prompt_token_ids=[rng.choice([0, 5, VOCAB_SIZE + 3])] * rng.randrange(0, 4),
            num_speculative_tokens=rng.choice([0, 1, 4, 17, 2**31]),
            sampling=common_pb2.SamplingParams(temperature=hostile_float(rng), top_p=hostile_float(rng)),
            target_vocabulary=vocabulary)).SerializeToString()

    def verdict():
        return draft_pb2.SpeculateRequest(verdict=draft_pb2.Verdict(
            block_index=rng.choice([0, 1, 2**32 - 1]), accepted_len=rng.choice([0, 1, 5, 2**32 - 1]),
            next_token_id=rng.choice([-1, 3, VOCAB_SIZE]), rollback_to=rng.choice([0, 4, 2**32 - 1]),
            num_speculative_tokens=rng.choice([0, 2, 99]))).SerializeToString()

    return [rng.choice([start, verdict, lambda: random_bytes(rng)])() for _ in range(rng.randrange(1, 5))]


def run_fuzz(target, draft, cases: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    statuses: dict[str, int] = {}
    with grpc.insecure_channel(target.address) as target_channel, grpc.insecure_channel(draft.address) as draft_channel:
        vocabulary = draft_pb2_grpc.DraftServiceStub(draft_channel).Info(draft_pb2.DraftInfoRequest(),
                                                                         timeout=10).vocabulary
        generate = target_channel.unary_unary("/splitspec.v1.TargetService/Generate", identity, identity)
        generate_stream = target_channel.unary_stream("/splitspec.v1.TargetService/GenerateStream", identity, identity)
        target_info = target_channel.unary_unary("/splitspec.v1.TargetService/Info", identity, identity)
        draft_info = draft_channel.unary_unary("/splitspec.v1.DraftService/Info", identity, identity)
        speculate = draft_channel.stream_stream("/splitspec.v1.DraftService/Speculate", identity, identity)
        calls = [
            lambda: generate(rng.choice([random_bytes(rng), hostile_generate_request(rng)]), timeout=30),
            lambda: list(generate_stream(rng.choice([random_bytes(rng), hostile_generate_request(rng)]), timeout=30)),
            lambda: target_info(random_bytes(rng), timeout=30),
            lambda: draft_info(random_bytes(rng), timeout=30),
            lambda: list(speculate(iter(hostile_speculate_stream(rng, vocabulary)), timeout=30)),
        ]
        for _ in range(cases):
            try:
                rng.choice(calls)()
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                assert code in CLEAN, (code, error.details())
            statuses[code.name] = statuses.get(code.name, 0) + 1
    return statuses


def check_survived(target, draft, reference, rss_before):
    assert target.alive() and draft.alive()
    with Client(target.address, timeout=60) as client:
        result = client.generate("The quick brown fox", max_new_tokens=24, ignore_eos=True)
        assert client.info().live_sessions == 0
    assert list(result.token_ids) == reference("The quick brown fox", 24)
    with grpc.insecure_channel(draft.address) as channel:
        assert draft_pb2_grpc.DraftServiceStub(channel).Info(draft_pb2.DraftInfoRequest(), timeout=10).live_sessions == 0
    for server, before in zip((target, draft), rss_before):
        growth = rss_mb(server.process.pid) - before
        assert growth < RSS_GROWTH_BOUND_MB, f"{server.module} grew {growth:.0f} MB"


def _fuzz_and_check(target, draft, reference, cases):
    run_fuzz(target, draft, 50, seed=99)  # warm-up: allocator pools and caches settle
    rss_before = [rss_mb(s.process.pid) for s in (target, draft)]
    statuses = run_fuzz(target, draft, cases)
    assert statuses.get("INVALID_ARGUMENT", 0) > cases // 4 and statuses.get("FAILED_PRECONDITION", 0) > 0
    check_survived(target, draft, reference, rss_before)
    print(f"fuzz: {cases} hostile messages, statuses {statuses}, both servers up, 0 sessions leaked")


def test_hostile_messages_get_clean_statuses(target_related, related_draft, reference):
    _fuzz_and_check(target_related, related_draft, reference, cases=1000)


@pytest.mark.slow
def test_hostile_messages_large_run(target_related, related_draft, reference):
    _fuzz_and_check(target_related, related_draft, reference, cases=20_000)
