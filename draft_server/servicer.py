"""DraftService: message -> domain object -> engine call -> message."""

import asyncio
import dataclasses

from splitspec_client.v1 import draft_pb2, draft_pb2_grpc

from draft_server.engine import DraftEngine
from splitspec import wire
from splitspec.errors import FailedPrecondition, InvalidArgument

ISA_TO_PB = {
    "amx": draft_pb2.ISA_AMX,
    "avx512": draft_pb2.ISA_AVX512,
    "avx2": draft_pb2.ISA_AVX2,
    "baseline": draft_pb2.ISA_BASELINE,
}


@dataclasses.dataclass(frozen=True)
class DraftServerDescription:
    """What Info reports besides live counters: fixed when the server starts."""

    model: str
    dtype: str
    backend: str
    isa: str
    isa_flags: list[str]
    pinned_cpus: list[int]
    numa_node: int | None
    threads: int
    pinning_notes: list[str]


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, engine: DraftEngine, description: DraftServerDescription):
        self.engine = engine
        self.description = description

    async def Speculate(self, request_iterator, context):
        session = None
        # The next request, read in a task only while a block is drafted ahead (the handler then waits for either);
        # otherwise read directly, after the block went out: one task and one wait fewer on the round's path.
        next_request: asyncio.Future | None = None
        ahead: asyncio.Future | None = None  # the block being drafted ahead of the next verdict
        try:
            while True:
                if ahead is not None:
                    if next_request is None:
                        next_request = asyncio.ensure_future(anext(request_iterator, None))
                    await asyncio.wait({next_request, ahead}, return_when=asyncio.FIRST_COMPLETED)
                    if ahead.done():
                        # Sent as soon as it is ready: the target may verify it without waiting for a round trip.
                        block, ahead = ahead.result(), None
                        if block is not None:
                            yield draft_pb2.SpeculateResponse(block=wire.block_to_pb(block))
                    if not next_request.done():
                        continue
                if next_request is not None:  # read while a block was drafted ahead, perhaps still on its way
                    request, next_request = await next_request, None
                else:
                    request = await anext(request_iterator, None)
                if request is None:
                    return
                kind = request.WhichOneof("kind")
                if kind == "start":
                    if session is not None:
                        raise FailedPrecondition("duplicate start: this stream already has a session")
                    start = wire.session_start_from_pb(request.start)
                    session, block = await self.engine.start_session(start)
                    yield draft_pb2.SpeculateResponse(block=wire.block_to_pb(block))
                    num_tokens = start.num_speculative_tokens
                elif kind == "verdict":
                    if session is None:
                        raise FailedPrecondition("verdict before start: send a SessionStart first")
                    verdict = wire.verdict_from_pb(request.verdict)
                    if ahead is not None:
                        session.pending_verdict = verdict
                        block, ahead = await ahead, None
                        if block is not None and session.keeps_ahead_block(verdict):
                            yield draft_pb2.SpeculateResponse(block=wire.block_to_pb(block))
                    block = await self.engine.step(session, verdict)
                    if block is not None:
                        yield draft_pb2.SpeculateResponse(block=wire.block_to_pb(block))
                    num_tokens = verdict.num_speculative_tokens
                else:
                    raise InvalidArgument("kind", "a SpeculateRequest must carry start or verdict")
                if session.draft_ahead and num_tokens > 0:
                    ahead = asyncio.ensure_future(self.engine.draft_ahead(session, num_tokens))
        finally:
            if next_request is not None:
                next_request.cancel()
            if ahead is not None:
                ahead.cancel()
            if session is not None:
                self.engine.close_session(session)

    async def Info(self, request, context):
        d = self.description
        return draft_pb2.DraftInfoResponse(
            model=d.model,
            dtype=d.dtype,
            backend=d.backend,
            isa=ISA_TO_PB[d.isa],
            isa_flags=d.isa_flags,
            pinned_cpus=d.pinned_cpus,
            numa_node=-1 if d.numa_node is None else d.numa_node,
            threads=d.threads,
            vocabulary=wire.vocabulary_to_pb(self.engine.vocabulary),
            live_sessions=self.engine.live_sessions,
            max_num_speculative_tokens=self.engine.limits.max_num_speculative_tokens,
            max_context_tokens=self.engine.limits.max_context_tokens,
            max_sessions=self.engine.limits.max_sessions,
            pinning_notes=d.pinning_notes,
        )
