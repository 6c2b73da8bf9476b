"""Blocking client of a splitspec target server.

    with Client("localhost:50051") as client:
        print(client.generate("The capital of France is", max_new_tokens=16).text)
        for chunk in client.stream("Once upon a time", temperature=0.8, seed=1):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from ._request import build_generate_request
from .errors import raising_typed_errors
from .types import GenerationResult, StreamChunk, TargetInfo
from .v1 import target_pb2, target_pb2_grpc


class _ClientBase:
    """What Client and AsyncClient share: the channel, the stub and the options sent with every call."""

    # grpc for the blocking client, grpc.aio for the async one: both open channels with the same arguments.
    _grpc: Any = grpc

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
    ):
        """`target` is host:port. `timeout` (seconds) is the deadline of every call that does not give its own;
        None waits indefinitely. `credentials` opens a TLS channel; `metadata` goes with every call (e.g. an
        authorization header); `options` are gRPC channel arguments."""
        if credentials is None:
            self._channel = self._grpc.insecure_channel(target, options=options)
        else:
            self._channel = self._grpc.secure_channel(target, credentials, options=options)
        self._stub = target_pb2_grpc.TargetServiceStub(self._channel)
        self.target = target
        self._timeout = timeout
        self._metadata = tuple(metadata)

    def _call_options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self._timeout if timeout is None else timeout, "metadata": self._metadata}


class Client(_ClientBase):
    """Blocking client of a target server. Every failed call raises a `splitspec_client.errors.SplitspecError`.

    Generation parameters (`**params`) are the keyword arguments of
    `splitspec_client._request.build_generate_request`: max_new_tokens, temperature, top_p, top_k, seed, stop,
    ignore_eos, num_speculative_tokens, request_id.
    """

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None, **params) -> GenerationResult:
        """The whole completion of `prompt` (text or token ids) in one response."""
        request = build_generate_request(prompt, **params)
        with raising_typed_errors():
            return GenerationResult.from_pb(self._stub.Generate(request, **self._call_options(timeout)))

    def stream(self, prompt: str | Sequence[int], *, timeout: float | None = None, **params) -> Iterator[StreamChunk]:
        """The completion chunk by chunk as the target accepts tokens; the last chunk has finish_reason and stats.

        The RPC starts at the first next(). Leaving a `for` loop early, or calling close() on the iterator,
        cancels it on the server.
        """
        # Built here rather than in the generator so that a wrong argument fails at the call, not at the first next().
        request = build_generate_request(prompt, **params)
        return self._stream(request, timeout)

    def _stream(self, request: target_pb2.GenerateRequest, timeout: float | None) -> Iterator[StreamChunk]:
        call = self._stub.GenerateStream(request, **self._call_options(timeout))
        try:
            with raising_typed_errors():
                for response in call:
                    yield StreamChunk.from_pb(response)
        finally:
            # Runs on GeneratorExit too, so an abandoned stream frees its server-side session; no-op once done.
            call.cancel()

    def info(self, *, timeout: float | None = None) -> TargetInfo:
        """What the target server runs and which draft servers it uses."""
        request = target_pb2.TargetInfoRequest()
        with raising_typed_errors():
            return TargetInfo.from_pb(self._stub.Info(request, **self._call_options(timeout)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
