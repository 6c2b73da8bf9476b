"""TargetService's handlers without a model: a scripted engine stands in for TargetEngine."""

import asyncio
import time
import types

import pytest
from splitspec_client.v1 import target_pb2

from target_server.engine import GenerationStats, GenerationUpdate
from target_server.request import Limits
from target_server.servicer import TOKENIZE_INLINE_CHARS, TargetServicer

TOKENIZE_S = 0.2


class SlowTokenizer:
    """Takes TOKENIZE_S per prompt, as a megabyte prompt does with a real tokenizer."""

    def encode(self, text: str) -> list[int]:
        time.sleep(TOKENIZE_S)
        return [1, 2, 3]


class ScriptedEngine:
    """Answers every request with one token; records when the servicer said the request arrived."""

    def __init__(self):
        self.tokenizer = SlowTokenizer()
        self.arrivals: list[int | None] = []

    async def generate(self, request, arrived=None):
        self.arrivals.append(arrived)
        yield GenerationUpdate([5], "x", "length", stats=GenerationStats(prompt_tokens=3, generated_tokens=1))


@pytest.mark.parametrize("prompt_chars", [10, TOKENIZE_INLINE_CHARS + 1])  # tokenized inline, then off the loop
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_stats_times_count_from_arrival_not_from_the_end_of_tokenizing(rpc, prompt_chars):
    # target.proto: time_to_first_token_ns and total_time_ns run "from request arrival"; a long prompt is tokenized
    # before the engine sees the request, and that time is the client's to wait too.
    engine = ScriptedEngine()
    limits = Limits(vocab_size=10, max_context_tokens=4096, num_speculative_tokens=2, max_num_speculative_tokens=4)
    servicer = TargetServicer(engine, limits, model="scripted", dtype="float32")
    message = target_pb2.GenerateRequest(prompt="a" * prompt_chars, max_new_tokens=1)

    async def call() -> int:
        called = time.perf_counter_ns()
        if rpc == "Generate":
            await servicer.Generate(message, None)
        else:
            [_ async for _ in servicer.GenerateStream(message, None)]
        return called

    called = asyncio.run(call())
    [arrived] = engine.arrivals
    assert arrived is not None and called <= arrived <= called + TOKENIZE_S * 1e9 / 4
