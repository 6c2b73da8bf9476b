"""asyncio client of a splitspec target server: `Client`'s methods, awaitable, on grpc.aio.

    async with AsyncClient("localhost:50051") as client:
        result = await client.generate("The capital of France is", max_new_tokens=16)
        async for chunk in client.stream("Once upon a time"):
            print(chunk.text, end="", flush=True)

Create it inside the running event loop: a grpc.aio channel belongs to the loop it was opened in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc.aio

from ._request import build_generate_request
from .client import _ClientBase
from .errors import raising_typed_errors
from .types import GenerationResult, StreamChunk, TargetInfo
from .v1 import target_pb2


class AsyncClient(_ClientBase):
    """asyncio client of a target server; same arguments, parameters and errors as `splitspec_client.Client`."""

    _grpc = grpc.aio

    async def generate(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **params
    ) -> GenerationResult:
        """The whole completion of `prompt` (text or token ids) in one response."""
        request = build_generate_request(prompt, **params)
        with raising_typed_errors():
            return GenerationResult.from_pb(await self._stub.Generate(request, **self._call_options(timeout)))

    def stream(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **params
    ) -> AsyncIterator[StreamChunk]:
        """The completion chunk by chunk; the last chunk has finish_reason and stats.

        Use with `async for`. The RPC starts at the first chunk asked for; `await chunks.aclose()` (or leaving the
        loop, once the iterator is collected) cancels it on the server.
        """
        request = build_generate_request(prompt, **params)
        return self._stream(request, timeout)

    async def _stream(self, request: target_pb2.GenerateRequest, timeout: float | None) -> AsyncIterator[StreamChunk]:
        call = self._stub.GenerateStream(request, **self._call_options(timeout))
        try:
            with raising_typed_errors():
                async for response in call:
                    yield StreamChunk.from_pb(response)
        finally:
            call.cancel()

    async def info(self, *, timeout: float | None = None) -> TargetInfo:
        """What the target server runs and which draft servers it uses."""
        request = target_pb2.TargetInfoRequest()
        with raising_typed_errors():
            return TargetInfo.from_pb(await self._stub.Info(request, **self._call_options(timeout)))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
