"""Bad input gets INVALID_ARGUMENT naming the field; protocol violations on the draft stream get their status;
a draft with another vocabulary is refused; the servers keep serving."""

import math

import grpc
import pytest
from splitspec_client import Client, InvalidArgumentError
from splitspec_client.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc

from servers import start_target
from tiny_models import VOCAB_SIZE

INVALID_REQUESTS = [
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt="x" * 5000)),  # more tokens than the model's context of 512
    ("prompt_token_ids", dict(prompt_token_ids=[1, VOCAB_SIZE])),
    ("prompt_token_ids", dict(prompt_token_ids=[-1])),
    ("prompt", dict(prompt="hi", prompt_token_ids=[5])),
    ("max_new_tokens", dict(prompt="hi", max_new_tokens=0)),
    ("max_new_tokens", dict(prompt="hi", max_new_tokens=-3)),
    ("max_new_tokens", dict(prompt="hi", max_new_tokens=600)),
    ("sampling.temperature", dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=-0.5))),
    ("sampling.temperature", dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=math.nan))),
    ("sampling.temperature", dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=math.inf))),
    ("sampling.top_p", dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=1, top_p=0.0))),
    ("sampling.top_p", dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=1, top_p=1.5))),
    ("sampling.top_p", dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=1, top_p=math.nan))),
    ("sampling.top_k", dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=1, top_k=-1))),
    ("num_speculative_tokens", dict(prompt="hi", num_speculative_tokens=-1)),
    ("num_speculative_tokens", dict(prompt="hi", num_speculative_tokens=17)),
    ("stop", dict(prompt="hi", stop=[""])),
]


@pytest.mark.parametrize("field,fields", INVALID_REQUESTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID_REQUESTS)])
def test_invalid_field_is_invalid_argument_naming_it(target_unrelated, field, fields):
    request = target_pb2.GenerateRequest(**fields)
    with grpc.insecure_channel(target_unrelated.address) as channel:
        stub = target_pb2_grpc.TargetServiceStub(channel)
        for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as error:
                call(request, timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.details().startswith(field), error.value.details()
        # The server keeps serving.
        ok = stub.Generate(target_pb2.GenerateRequest(prompt="hi", max_new_tokens=4), timeout=30)
        assert len(ok.token_ids) >= 1


def test_long_prompts_are_tokenized_off_the_event_loop_and_refused_by_length_first(target_unrelated, reference):
    long_prompt = "the " * 300  # 1200 characters, 302 tokens: tokenized on the servicer's tokenizing thread
    with Client(target_unrelated.address, timeout=60) as client:
        result = client.generate(long_prompt, max_new_tokens=8, ignore_eos=True)
        assert list(result.token_ids) == reference(long_prompt, 8)
        # 2 MB cannot fit 512 tokens of at most 20 characters each: refused before tokenizing (seconds of CPU).
        with pytest.raises(InvalidArgumentError, match="2000000 characters cannot fit the model's context"):
            client.generate("x" * 2_000_000, max_new_tokens=8)
        assert client.generate("hi", max_new_tokens=3).stats.generated_tokens >= 1


def test_sdk_raises_typed_error_with_the_servers_message(target_unrelated):
    with Client(target_unrelated.address, timeout=30) as client:
        with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
            client.generate("hi", max_new_tokens=0)
        with pytest.raises(InvalidArgumentError, match="sampling.top_p"):
            list(client.stream("hi", temperature=1.0, top_p=2.0))
        assert client.generate("hi", max_new_tokens=3).stats.generated_tokens >= 1


def _speculate(address: str, requests: list[draft_pb2.SpeculateRequest]):
    with grpc.insecure_channel(address) as channel:
        responses = []
        with pytest.raises(grpc.RpcError) as error:
            for response in draft_pb2_grpc.DraftServiceStub(channel).Speculate(iter(requests), timeout=30):
                responses.append(response)
        return error.value, responses


def _draft_vocabulary(address: str) -> common_pb2.VocabularyInfo:
    with grpc.insecure_channel(address) as channel:
        return draft_pb2_grpc.DraftServiceStub(channel).Info(draft_pb2.DraftInfoRequest(), timeout=10).vocabulary


def _start(vocabulary, k=3, prompt=(1, 20, 30), sampling=None):
    return draft_pb2.SpeculateRequest(start=draft_pb2.SessionStart(
        prompt_token_ids=list(prompt), num_speculative_tokens=k, target_vocabulary=vocabulary, request_id="t",
        sampling=sampling))


def _verdict(**fields):
    return draft_pb2.SpeculateRequest(verdict=draft_pb2.Verdict(**fields))


def test_draft_protocol_violations(unrelated_draft):
    vocabulary = _draft_vocabulary(unrelated_draft.address)
    start = _start(vocabulary)
    cases = [
        ([_verdict(block_index=0, accepted_len=0, next_token_id=5, rollback_to=3)],
         grpc.StatusCode.FAILED_PRECONDITION, "verdict before start"),
        ([start, start], grpc.StatusCode.FAILED_PRECONDITION, "duplicate start"),
        ([start, _verdict(block_index=4, accepted_len=0, next_token_id=5, rollback_to=3, num_speculative_tokens=3)],
         grpc.StatusCode.FAILED_PRECONDITION, "open block is 0"),
        ([start, _verdict(block_index=0, accepted_len=4, next_token_id=5, rollback_to=7, num_speculative_tokens=3)],
         grpc.StatusCode.INVALID_ARGUMENT, "verdict.accepted_len"),
        ([start, _verdict(block_index=0, accepted_len=1, next_token_id=5, rollback_to=9, num_speculative_tokens=3)],
         grpc.StatusCode.INVALID_ARGUMENT, "verdict.rollback_to"),
        ([start, _verdict(block_index=0, accepted_len=1, next_token_id=VOCAB_SIZE, rollback_to=4)],
         grpc.StatusCode.INVALID_ARGUMENT, "verdict.next_token_id"),
        ([start, _verdict(block_index=0, accepted_len=1, next_token_id=5, rollback_to=4, num_speculative_tokens=99)],
         grpc.StatusCode.INVALID_ARGUMENT, "verdict.num_speculative_tokens"),
        ([start, _verdict(block_index=0, accepted_len=1, next_token_id=5, rollback_to=4, num_verified_tokens=4)],
         grpc.StatusCode.INVALID_ARGUMENT, "verdict.num_verified_tokens"),
        ([start, _verdict(block_index=0, accepted_len=2, next_token_id=5, rollback_to=5, num_verified_tokens=1)],
         grpc.StatusCode.INVALID_ARGUMENT, "exceeds the 1 tokens verified"),
        ([_start(vocabulary, k=0)], grpc.StatusCode.INVALID_ARGUMENT, "start.num_speculative_tokens"),
        ([_start(vocabulary, k=17)], grpc.StatusCode.INVALID_ARGUMENT, "must be in [1, 16], got 17"),  # its max: 16
        # A prompt filling the draft model's 512 positions leaves no room for a block.
        ([_start(vocabulary, k=1, prompt=(5,) * 512)], grpc.StatusCode.FAILED_PRECONDITION,
         "do not fit the draft model's context (512 tokens, 512 used)"),
        ([_start(vocabulary, prompt=())], grpc.StatusCode.INVALID_ARGUMENT, "start.prompt_token_ids"),
        ([_start(vocabulary, prompt=(1, VOCAB_SIZE + 7))], grpc.StatusCode.INVALID_ARGUMENT, "start.prompt_token_ids"),
        ([draft_pb2.SpeculateRequest()], grpc.StatusCode.INVALID_ARGUMENT, "kind"),
        # A verdict asking for no further block leaves none open: one more verdict is out of order.
        ([start, _verdict(block_index=0, accepted_len=1, next_token_id=5, rollback_to=4, num_speculative_tokens=0),
          _verdict(block_index=1, accepted_len=0, next_token_id=5, rollback_to=5)],
         grpc.StatusCode.FAILED_PRECONDITION, "no block is open"),
        # The draft validates the sampling parameters as the target does (common.proto's ranges).
        ([_start(vocabulary, sampling=common_pb2.SamplingParams(temperature=1.0, top_p=0.0))],
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
        ([_start(vocabulary, sampling=common_pb2.SamplingParams(temperature=-1.0))],
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ]
    for requests, code, message in cases:
        error, responses = _speculate(unrelated_draft.address, requests)
        assert (error.code(), message in error.details()) == (code, True), (message, error.details())
    assert unrelated_draft.alive()
    with grpc.insecure_channel(unrelated_draft.address) as channel:
        info = draft_pb2_grpc.DraftServiceStub(channel).Info(draft_pb2.DraftInfoRequest(), timeout=10)
    assert info.live_sessions == 0  # every failed stream freed its session
    assert info.max_sessions == 256  # its --max-sessions, so that a target opens no more


def test_draft_refuses_a_target_with_another_vocabulary(unrelated_draft):
    vocabulary = _draft_vocabulary(unrelated_draft.address)
    other = common_pb2.VocabularyInfo()
    other.CopyFrom(vocabulary)
    other.vocab_size = 50000
    error, responses = _speculate(unrelated_draft.address, [_start(other)])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vocab_size" in error.details() and not responses


def test_target_with_mismatched_draft_serves_alone_and_says_why(model_dirs, log_dir, reference):
    from servers import start_draft

    draft = start_draft(model_dirs["mismatched_draft"], log_dir, "mismatched-draft")
    target = start_target(model_dirs["target"], log_dir, "target-mismatched", [draft.address])
    try:
        with Client(target.address, timeout=60) as client:
            info = client.info()
            result = client.generate("The quick brown fox", max_new_tokens=32, ignore_eos=True)
        [status] = info.draft_servers
        assert not status.connected and "vocabulary mismatch" in status.error and "vocab_size" in status.error
        assert list(result.token_ids) == reference("The quick brown fox", 32)
        assert "vocabulary mismatch" in result.stats.fallback_reason
        assert draft.alive() and target.alive()
    finally:
        assert target.stop() == 0
        assert draft.stop() == 0
