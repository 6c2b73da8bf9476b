"""Client SDK against a scripted in-process TargetService (fake_target.py): request building, conversions, streaming,
cancellation, error mapping, deadlines and the asyncio client. The CLI: test_client_cli.py; the real servers are
tested elsewhere."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys

import grpc
import pytest

from fake_target import STATS_FIELDS, STATUS_ERRORS, address, client, fake  # noqa: F401 (fixtures)
from splitspec_client import AsyncClient, Client, GenerationStats, StreamChunk, errors
from splitspec_client._request import build_generate_request
from splitspec_client.v1 import target_pb2


# --- request building ---


def test_text_prompt_leaves_optional_fields_to_the_server():
    request = build_generate_request("Hello")
    assert request.prompt == "Hello" and list(request.prompt_token_ids) == []
    assert request.max_new_tokens == 64
    assert request.sampling.temperature == 0.0 and request.sampling.top_k == 0
    assert not request.sampling.HasField("top_p")
    assert not request.sampling.HasField("seed")
    assert not request.HasField("num_speculative_tokens")
    assert list(request.stop) == [] and not request.ignore_eos and request.request_id == ""


def test_token_id_prompt_and_every_parameter():
    request = build_generate_request(
        [1, 15043, 29892],
        max_new_tokens=8,
        temperature=0.7,
        top_p=0.9,
        top_k=50,
        seed=0,
        stop=["\n", "END"],
        ignore_eos=True,
        num_speculative_tokens=0,
        request_id="req-1",
    )
    assert request.prompt == "" and list(request.prompt_token_ids) == [1, 15043, 29892]
    assert request.max_new_tokens == 8
    assert request.sampling.temperature == pytest.approx(0.7)
    assert request.sampling.HasField("top_p") and request.sampling.top_p == pytest.approx(0.9)
    assert request.sampling.top_k == 50
    # Explicit zeros stay present: seed 0 is a seed, and 0 draft tokens turns speculation off.
    assert request.sampling.HasField("seed") and request.sampling.seed == 0
    assert request.HasField("num_speculative_tokens") and request.num_speculative_tokens == 0
    assert list(request.stop) == ["\n", "END"]
    assert request.ignore_eos and request.request_id == "req-1"


def test_out_of_range_values_are_left_to_the_server():
    request = build_generate_request("x", max_new_tokens=0, temperature=-1.0, top_p=2.0, top_k=-3)
    assert (request.max_new_tokens, request.sampling.top_p, request.sampling.top_k) == (0, 2.0, -3)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        (42, {}, "prompt"),
        ("x", {"stop": "END"}, "stop"),
        ("x", {"max_new_tokens": "5"}, "max_new_tokens"),
        ("x", {"temperature": "hot"}, "temperature"),
        ([1, "two"], {}, "prompt_token_ids"),
    ],
)
def test_wrong_python_type_raises_type_error_naming_the_field(prompt, params, field):
    with pytest.raises(TypeError, match=f"^{field}: "):
        build_generate_request(prompt, **params)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ("x", {"seed": -1}, "seed"),
        ("x", {"max_new_tokens": 2**31}, "max_new_tokens"),
        ("\udcff", {}, "prompt"),  # a lone surrogate, as Python decodes a command-line argument that is not UTF-8
        ("x", {"stop": ["\udcff"]}, "stop"),
    ],
)
def test_what_the_message_cannot_hold_raises_value_error_naming_the_field(prompt, params, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        build_generate_request(prompt, **params)


# --- blocking client ---


def test_generate_returns_result_and_stats(fake, address):
    with Client(address, metadata=[("authorization", "Bearer t0k")]) as client:
        result = client.generate("Capital of France?", max_new_tokens=3, seed=7, request_id="r-1")
    assert fake.requests == [build_generate_request("Capital of France?", max_new_tokens=3, seed=7, request_id="r-1")]
    assert fake.metadata[0]["authorization"] == "Bearer t0k"
    assert result.text == " Paris." and result.token_ids == (3681, 13, 2)
    assert result.finish_reason == "eos_token"
    assert result.stats == GenerationStats(**STATS_FIELDS)
    assert result.stats.time_to_first_token_s == pytest.approx(0.12)
    assert result.stats.total_time_s == pytest.approx(1.5)


def test_stats_have_every_proto_field_under_the_same_name():
    proto_fields = [field.name for field in target_pb2.GenerationStats.DESCRIPTOR.fields]
    assert list(GenerationStats.__dataclass_fields__) == proto_fields


def test_stream_yields_chunks_in_order_with_stats_on_the_last(client):
    chunks = list(client.stream("Capital of France?"))
    assert [(chunk.text, chunk.token_ids) for chunk in chunks] == [(" Paris", (3681,)), (".", (13,)), ("", (2,))]
    assert all(chunk.finish_reason is None and chunk.stats is None for chunk in chunks[:-1])
    assert chunks[-1].finish_reason == "eos_token"
    assert chunks[-1].stats.generated_tokens == 3 and chunks[-1].stats.num_accepted_tokens_per_pos == (2, 1, 0, 0)
    timing = chunks[1].round_timing
    assert (timing.round_ns, timing.batch_size, timing.drafted_ahead) == (9_000_000, 3, False)
    assert timing.overhead_ns == 9_000_000 - 4_200_000 - 3_500_000
    assert dataclasses.replace(timing, drafted_ahead=True).overhead_ns == 9_000_000 - 4_200_000
    assert timing.target_overhead_ns == 9_000_000 - 4_200_000 - timing.draft_wait_ns
    # A first block, drafted while the target prefilled, was there at once: its drafting is no part of the round.
    first = dataclasses.replace(timing, draft_wait_ns=200_000, block_draft_ns=11_000_000)
    assert first.waited_draft_ns == 200_000 and first.overhead_ns == 9_000_000 - 4_200_000 - 200_000
    assert chunks[0].round_timing is None


def test_leaving_the_stream_cancels_the_server_call(fake, client):
    fake.hold_stream = True
    for chunk in client.stream("Once upon a time"):
        assert chunk == StreamChunk(text=" Paris", token_ids=(3681,), finish_reason=None, stats=None,
                                    round_timing=None)
        break
    assert fake.stream_cancelled.wait(3.0)


def test_stream_raises_typed_error(fake, client):
    fake.abort = (grpc.StatusCode.RESOURCE_EXHAUSTED, "64 sessions live, the limit")
    with pytest.raises(errors.ResourceExhaustedError, match="64 sessions live"):
        list(client.stream("x"))


@pytest.mark.parametrize(("code", "error_class"), STATUS_ERRORS)
def test_status_code_maps_to_its_exception(fake, client, code, error_class):
    fake.abort = (code, "top_p: must be in (0, 1], got 2.0")
    with pytest.raises(error_class) as caught:
        client.generate("x")
    assert type(caught.value) is error_class
    assert caught.value.code == code
    assert caught.value.details == "top_p: must be in (0, 1], got 2.0"
    assert str(caught.value) == f"{code.name}: top_p: must be in (0, 1], got 2.0"
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_deadline_comes_from_the_client_or_the_call(fake, address):
    fake.delay_s = 0.5
    with Client(address, timeout=0.1) as client:
        with pytest.raises(errors.DeadlineExceededError):
            client.generate("x")
        assert client.generate("x", timeout=5.0).text == " Paris."  # the call's timeout wins
    with Client(address) as client, pytest.raises(errors.DeadlineExceededError):
        client.info(timeout=0.1)


def test_unreachable_server_is_unavailable():
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=2.0) as client, pytest.raises(errors.UnavailableError):
        client.generate("x")


def test_info(client):
    info = client.info()
    assert (info.model, info.device, info.dtype) == ("tiny-llama", "cuda", "bfloat16")
    assert info.vocabulary.vocab_size == 32000 and info.vocabulary.eos_token_ids == (2,)
    assert info.vocabulary.pad_token_id == -1
    assert (info.num_speculative_tokens, info.max_num_speculative_tokens, info.max_context_tokens) == (4, 8, 2048)
    assert [(s.address, s.connected, s.model, s.error) for s in info.draft_servers] == [
        ("cpu-1:50052", True, "tiny-draft", ""),
        ("cpu-2:50052", False, "", "connection refused"),
    ]


# --- asyncio client ---


def test_async_generate_stream_and_info(fake, address):
    async def scenario():
        async with AsyncClient(address, timeout=5.0) as client:
            result = await client.generate([1, 2, 3], top_p=0.5)
            chunks = [chunk async for chunk in client.stream("x")]
            info = await client.info()
        return result, chunks, info

    result, chunks, info = asyncio.run(scenario())
    assert fake.requests[0] == build_generate_request([1, 2, 3], top_p=0.5)
    assert result.text == " Paris." and result.finish_reason == "eos_token" and result.stats.rounds == 2
    assert [chunk.text for chunk in chunks] == [" Paris", ".", ""]
    assert chunks[-1].finish_reason == "eos_token" and chunks[-1].stats.acceptance_rate == 0.375
    assert info.model == "tiny-llama" and len(info.draft_servers) == 2


def test_async_leaving_the_stream_cancels_the_server_call(fake, address):
    fake.hold_stream = True

    async def scenario():
        async with AsyncClient(address) as client:
            async for _ in client.stream("x"):
                break
            # Checked before the channel closes, which would cancel the call anyway.
            return await asyncio.to_thread(fake.stream_cancelled.wait, 3.0)

    assert asyncio.run(scenario())


@pytest.mark.parametrize(("code", "error_class"), STATUS_ERRORS)
def test_async_status_code_maps_to_its_exception(fake, address, code, error_class):
    fake.abort = (code, "draft vocabulary differs")

    async def scenario():
        async with AsyncClient(address) as client:
            with pytest.raises(error_class) as generate_error:
                await client.generate("x")
            with pytest.raises(error_class) as stream_error:
                [chunk async for chunk in client.stream("x")]
        return generate_error.value, stream_error.value

    for error in asyncio.run(scenario()):
        assert type(error) is error_class and error.code == code and error.details == "draft vocabulary differs"


def test_async_deadline(fake, address):
    fake.delay_s = 0.5

    async def scenario():
        async with AsyncClient(address, timeout=0.1) as client:
            with pytest.raises(errors.DeadlineExceededError):
                await client.generate("x")
            return await client.generate("x", timeout=5.0)

    assert asyncio.run(scenario()).text == " Paris."


def test_sdk_imports_neither_torch_nor_the_servers():
    code = (
        "import sys, splitspec_client, splitspec_client.cli, splitspec_client.aio\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'splitspec', 'draft_server', 'target_server'}))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"
