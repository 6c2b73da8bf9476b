"""A scripted in-process TargetService for the client SDK and CLI tests: canned responses (stats with every field,
three stream chunks, an Info), recorded requests and metadata, and a given abort status or delay. Its fixtures
(`fake`, `address`, `client`) are imported by the modules that use them."""

import threading
import time
from concurrent import futures

import grpc
import pytest

from splitspec_client import Client, errors
from splitspec_client.v1 import common_pb2, target_pb2, target_pb2_grpc

# Values exactly representable as float32, so that they survive the wire unchanged.
STATS_FIELDS = dict(
    prompt_tokens=5,
    generated_tokens=3,
    rounds=2,
    num_drafts=2,
    num_draft_tokens=8,
    num_accepted_tokens=3,
    num_accepted_tokens_per_pos=(2, 1, 0, 0),
    acceptance_rate=0.375,
    mean_accepted_length=2.5,
    time_to_first_token_ns=120_000_000,
    total_time_ns=1_500_000_000,
    draft_wait_ns=300_000_000,
    verify_ns=900_000_000,
    draft_server="127.0.0.1:50052",
    fallback_reason="",
    num_drafts_ahead=1,
    num_stale_drafts=0,
)
STATS = target_pb2.GenerationStats(**STATS_FIELDS)
GENERATE_RESPONSE = target_pb2.GenerateResponse(
    text=" Paris.", token_ids=[3681, 13, 2], finish_reason=target_pb2.FINISH_REASON_EOS_TOKEN, stats=STATS
)
STREAM_RESPONSES = [
    target_pb2.GenerateStreamResponse(token_ids=[3681], text=" Paris"),
    target_pb2.GenerateStreamResponse(token_ids=[13], text=".", round_timing=target_pb2.RoundTiming(
        round_ns=9_000_000, draft_wait_ns=4_000_000, block_draft_ns=3_500_000, verify_ns=4_200_000, batch_size=3)),
    target_pb2.GenerateStreamResponse(token_ids=[2], finish_reason=target_pb2.FINISH_REASON_EOS_TOKEN, stats=STATS),
]
INFO_RESPONSE = target_pb2.TargetInfoResponse(
    model="tiny-llama",
    device="cuda",
    dtype="bfloat16",
    vocabulary=common_pb2.VocabularyInfo(vocab_size=32000, eos_token_ids=[2], bos_token_id=1, pad_token_id=-1),
    max_context_tokens=2048,
    num_speculative_tokens=4,
    max_num_speculative_tokens=8,
    draft_servers=[
        target_pb2.DraftServerStatus(address="cpu-1:50052", connected=True, model="tiny-draft", live_sessions=1),
        target_pb2.DraftServerStatus(address="cpu-2:50052", error="connection refused"),
    ],
    live_sessions=1,
)

STATUS_ERRORS = [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError),
    (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
    (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
    (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
    (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
    (grpc.StatusCode.CANCELLED, errors.CancelledError),
    (grpc.StatusCode.INTERNAL, errors.InternalError),
    (grpc.StatusCode.DATA_LOSS, errors.SplitspecError),  # no class of its own: the base class
]


def _wait_while_active(context: grpc.ServicerContext, seconds: float) -> None:
    """Sleep up to `seconds`, returning early once the client has gone (deadline or cancellation)."""
    end = time.monotonic() + seconds
    while context.is_active() and time.monotonic() < end:
        time.sleep(0.01)


class FakeTarget(target_pb2_grpc.TargetServiceServicer):
    """Scripted TargetService: records each request and its metadata, answers canned messages or a given abort."""

    def __init__(self):
        self.requests: list[target_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.abort: tuple[grpc.StatusCode, str] | None = None
        self.delay_s = 0.0
        self.hold_stream = False  # after the first chunk, wait for the client to leave
        self.stream_cancelled = threading.Event()

    def _receive(self, request, context) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        _wait_while_active(context, self.delay_s)
        if self.abort is not None:
            context.abort(*self.abort)

    def Generate(self, request, context):
        self._receive(request, context)
        return GENERATE_RESPONSE

    def GenerateStream(self, request, context):
        self._receive(request, context)
        if not self.hold_stream:
            yield from STREAM_RESPONSES
            return
        try:
            yield STREAM_RESPONSES[0]
            _wait_while_active(context, 5.0)
        finally:
            # After the client cancels, grpc either resumes this generator (is_active() turns False in the loop) or
            # never does and closes it at the yield (GeneratorExit): both count.
            if not context.is_active():
                self.stream_cancelled.set()

    def Info(self, request, context):
        self._receive(request, context)
        return INFO_RESPONSE


@pytest.fixture
def fake() -> FakeTarget:
    return FakeTarget()


@pytest.fixture
def address(fake):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    target_pb2_grpc.add_TargetServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def client(address):
    with Client(address, timeout=5.0) as client:
        yield client
