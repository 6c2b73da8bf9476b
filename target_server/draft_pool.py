"""The target's side of the draft protocol: connections to draft servers and one link per session.

A draft server is an optimisation: when none is connected, compatible or responsive, sessions decode on the target
alone and produce the same output. Every failure here becomes a `DraftLinkError` that the engine answers by
falling back, never an error for the client.
"""

import asyncio
import dataclasses
import logging
import sys

import grpc
from splitspec_client.v1 import draft_pb2, draft_pb2_grpc

from splitspec import wire
from splitspec.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from splitspec.security import ClientSecurity
from splitspec.models import Vocabulary
from splitspec.protocol import CandidateBlock, SessionStart, Verdict

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
# A draft ends a call within moments of its half-close; one that does not (stalled) is cancelled after this long.
END_TIMEOUT_S = 5.0
# The tasks waiting for draft calls to end: the event loop keeps only weak references to tasks.
_ENDING: set[asyncio.Task] = set()


class DraftLinkError(Exception):
    """The draft link of one session failed; the session goes on without it.

    `full`: the draft is fine but holds no more sessions (RESOURCE_EXHAUSTED, or none of the pool's drafts has a
    session free): not a failure of the draft, which stays in rotation, and a session may open later."""

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full


@dataclasses.dataclass
class DraftEndpoint:
    address: str
    stub: draft_pb2_grpc.DraftServiceStub
    channel: grpc.aio.Channel
    connected: bool = False
    model: str = ""
    error: str = "not probed yet"
    max_context_tokens: int = 0
    max_num_speculative_tokens: int = 0
    max_sessions: int = 0  # what the draft holds at once (its --max-sessions); 0: it does not say
    live_sessions: int = 0  # this target's sessions on it
    # This target's live sessions there when it last refused one as full (other targets may hold the rest): no new
    # session goes there until one of them ends or a probe succeeds. None: no refusal since.
    full_at: int | None = None
    sessions_opened: int = 0
    consecutive_failures: int = 0
    links: set = dataclasses.field(default_factory=set, repr=False)  # this target's sessions open on it now


if sys.version_info >= (3, 11):
    async def _within(awaitable, timeout_s: float):
        """`awaitable` with a deadline, in this task (before 3.12, wait_for runs it in a task of its own: one more
        hop through the event loop per block)."""
        async with asyncio.timeout(timeout_s):
            return await awaitable
else:  # pragma: no cover (Python 3.10)
    _within = asyncio.wait_for


class DraftLink:
    """One session's Speculate stream."""

    def __init__(self, endpoint: DraftEndpoint, call):
        self.endpoint = endpoint
        self._call = call
        self._closed = False
        self._counted = True  # among the endpoint's live sessions
        self._blocks_read = 0
        self._read_deadline = None  # the asyncio.Timeout of the block being waited for
        self.gone_reason: str | None = None  # why the pool found the draft unreachable while this session was open

    @property
    def address(self) -> str:
        return self.endpoint.address

    def block_size(self, num_tokens: int) -> int:
        """`num_tokens` capped at the most this draft drafts per block (the target may allow more)."""
        return min(num_tokens, self.endpoint.max_num_speculative_tokens)

    async def next_block(self, timeout_s: float) -> CandidateBlock:
        if self.gone_reason:
            raise DraftLinkError(self.gone_reason)
        try:
            response = await self._read_within(timeout_s)
        except asyncio.TimeoutError as exc:
            raise DraftLinkError(self.gone_reason or f"no block from {self.address} within {timeout_s:.1f}s") from exc
        except grpc.RpcError as exc:
            # Before the first block, RESOURCE_EXHAUSTED refuses the SessionStart: the draft holds its --max-sessions.
            full = self._blocks_read == 0 and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            raise DraftLinkError(f"draft {self.address}: {exc.code().name}: {exc.details()}", full=full) from exc
        if response is grpc.aio.EOF:
            raise DraftLinkError(f"draft {self.address} ended the session")
        self._blocks_read += 1
        return wire.block_from_pb(response.block)

    if sys.version_info >= (3, 11):
        async def _read_within(self, timeout_s: float):
            async with asyncio.timeout(timeout_s) as self._read_deadline:
                try:
                    return await self._call.read()
                finally:
                    self._read_deadline = None
    else:  # pragma: no cover (Python 3.10: no reschedulable timeout; a draft gone waits out the timeout)
        async def _read_within(self, timeout_s: float):
            return await asyncio.wait_for(self._call.read(), timeout_s)

    def draft_gone(self, reason: str) -> None:
        """The pool's probe found the draft unreachable: the block waited for, if any, will not come. The wait ends
        now instead of at the draft timeout (a stalled host, a network partition), and so does any later one."""
        self.gone_reason = f"draft {self.address} stopped answering (its probe: {reason})"
        if self._read_deadline is not None:
            self._read_deadline.reschedule(asyncio.get_running_loop().time())

    async def send_start(self, start: SessionStart) -> None:
        await self._write(draft_pb2.SpeculateRequest(start=wire.session_start_to_pb(start)))

    async def send_verdict(self, verdict: Verdict) -> None:
        await self._write(draft_pb2.SpeculateRequest(verdict=wire.verdict_to_pb(verdict)))

    async def _write(self, request: draft_pb2.SpeculateRequest) -> None:
        try:
            await self._call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            raise DraftLinkError(f"draft {self.address}: cannot send: {exc}") from exc

    async def close(self, cancel: bool = False) -> None:
        """End the session on the draft: half-close when all went well, cancel after a failure."""
        if self._closed:
            return
        self._closed = True
        if cancel:
            self._call.cancel()
            self._ended()
            return
        # Counted until the draft ends the call, which it does once it has freed the session: a session opened
        # before would still find the draft full (RESOURCE_EXHAUSTED).
        ending = asyncio.ensure_future(self._end_when_the_draft_does())
        _ENDING.add(ending)
        ending.add_done_callback(_ENDING.discard)
        try:
            await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            self._call.cancel()

    async def _end_when_the_draft_does(self) -> None:
        try:
            await _within(self._read_to_the_end(), END_TIMEOUT_S)
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass
        except asyncio.TimeoutError:
            self._call.cancel()
        finally:
            self._ended()

    async def _read_to_the_end(self) -> None:
        """Read what the draft still sends (a block drafted ahead) up to the end of the call, which gRPC reports
        only once the messages before it are read."""
        while await self._call.read() is not grpc.aio.EOF:
            pass

    def _ended(self) -> None:
        self.endpoint.links.discard(self)
        if self._counted:
            self._counted = False
            self.endpoint.live_sessions -= 1
            self.endpoint.full_at = None  # a session ended: the draft has room for one again


class DraftPool:
    """Draft servers of this target: probed through Info, sessions spread over the connected ones.

    A draft that fails (unreachable, stalled, broken stream) is taken out of rotation at once and probed again
    with exponential back-off, from `probe_interval_s` up to `max_backoff_s`; it returns when a probe succeeds.
    """

    def __init__(self, addresses: list[str], target_vocabulary: Vocabulary, probe_interval_s: float = 2.0,
                 max_backoff_s: float = 30.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 security: ClientSecurity | None = None):
        self.target_vocabulary = target_vocabulary
        self.probe_interval_s = probe_interval_s
        self.max_backoff_s = max(max_backoff_s, probe_interval_s)
        self._channel_options = [("grpc.max_receive_message_length", max_message_bytes),
                                 ("grpc.max_send_message_length", max_message_bytes)]
        self.endpoints = []
        self.security = security or ClientSecurity()
        self.metadata = self.security.call_metadata()
        for address in addresses:
            channel, stub = self._connect(address)
            self.endpoints.append(DraftEndpoint(address, stub, channel))
        self._monitors: list[asyncio.Task] = []

    async def start(self) -> None:
        await asyncio.gather(*(self._probe(e) for e in self.endpoints))
        self._monitors = [asyncio.create_task(self._probe_forever(e)) for e in self.endpoints]

    async def close(self) -> None:
        for monitor in self._monitors:
            monitor.cancel()
        for endpoint in self.endpoints:
            await endpoint.channel.close()

    async def reconnect(self) -> None:
        """New channels to every draft, probed at once: for a draft known to be back (restarted on the same address)
        before the back-off's next probe, and without the old channel's reconnect back-off."""
        for endpoint in self.endpoints:
            old = endpoint.channel
            endpoint.channel, endpoint.stub = self._connect(endpoint.address)
            await old.close()
        await asyncio.gather(*(self._probe(e) for e in self.endpoints))

    def _connect(self, address: str) -> tuple[grpc.aio.Channel, draft_pb2_grpc.DraftServiceStub]:
        channel = self.security.channel(address, self._channel_options)
        return channel, draft_pb2_grpc.DraftServiceStub(channel)

    def _next_probe_delay(self, endpoint: DraftEndpoint) -> float:
        if endpoint.connected:
            return self.probe_interval_s
        return min(self.probe_interval_s * 2 ** min(endpoint.consecutive_failures, 16), self.max_backoff_s)

    async def _probe_forever(self, endpoint: DraftEndpoint) -> None:
        while True:
            await asyncio.sleep(self._next_probe_delay(endpoint))
            await self._probe(endpoint)

    @staticmethod
    def report_full(endpoint: DraftEndpoint) -> None:
        """`endpoint` refused a session (closed by now) for holding its most: it stays in rotation, but gets no new
        session until one of this target's sessions there ends (`DraftLink._ended`), or a probe succeeds (another
        target's may have)."""
        endpoint.full_at = endpoint.live_sessions

    def report_failure(self, endpoint: DraftEndpoint, reason: str) -> None:
        """A session on `endpoint` failed: stop sending it sessions until a probe says it is back. The sessions
        that were open on it fail too, but only probes count towards the back-off: one failure that ends many
        sessions at once must not delay the draft's return by the longest back-off."""
        if endpoint.connected:
            self._set_state(endpoint, False, reason)

    async def _probe(self, endpoint: DraftEndpoint) -> None:
        try:
            info = await endpoint.stub.Info(draft_pb2.DraftInfoRequest(), timeout=PROBE_TIMEOUT_S,
                                            metadata=self.metadata)
        except grpc.RpcError as exc:
            reason = f"unreachable: {exc.code().name}: {exc.details()}"
            self._set_state(endpoint, False, reason)
            for link in list(endpoint.links):  # their blocks will not come either
                link.draft_gone(reason)
            return
        endpoint.model = info.model
        endpoint.max_context_tokens = info.max_context_tokens
        endpoint.max_num_speculative_tokens = info.max_num_speculative_tokens
        endpoint.max_sessions = info.max_sessions
        endpoint.full_at = None
        mismatch = self.target_vocabulary.mismatch(wire.vocabulary_from_pb(info.vocabulary))
        if mismatch:
            self._set_state(endpoint, False, f"vocabulary mismatch with the target: {mismatch}")
        else:
            self._set_state(endpoint, True, "")

    @staticmethod
    def _set_state(endpoint: DraftEndpoint, connected: bool, error: str) -> None:
        if (connected, error) != (endpoint.connected, endpoint.error):
            if connected:
                log.info("draft %s connected (%s)", endpoint.address, endpoint.model)
            else:
                log.error("draft %s not used: %s", endpoint.address, error)
        endpoint.connected, endpoint.error = connected, error
        endpoint.consecutive_failures = 0 if connected else endpoint.consecutive_failures + 1

    def why_unusable(self, total_tokens: int) -> str | None:
        """Why no draft can serve this session, or None when one can."""
        if not self.endpoints:
            return "no draft server configured"
        if not any(e.connected for e in self.endpoints):
            return "no draft server connected: " + "; ".join(f"{e.address}: {e.error}" for e in self.endpoints)
        if not any(self._fits(e, total_tokens) for e in self.endpoints if e.connected):
            return "no connected draft server fits the request (the draft's context is shorter)"
        return None

    @staticmethod
    def _fits(endpoint: DraftEndpoint, total_tokens: int) -> bool:
        return total_tokens <= endpoint.max_context_tokens

    @staticmethod
    def _has_room(endpoint: DraftEndpoint) -> bool:
        """Whether a session may open there: fewer of this target's are open than the draft holds, and than when it
        last refused one."""
        return ((not endpoint.max_sessions or endpoint.live_sessions < endpoint.max_sessions)
                and (endpoint.full_at is None or endpoint.live_sessions < endpoint.full_at))

    async def open(self, start: SessionStart, total_tokens: int) -> DraftLink:
        """Open a session on the least busy connected draft that fits it and has a session free; raises
        DraftLinkError when none can (`full` when only free sessions are missing: one may open later)."""
        reason = self.why_unusable(total_tokens)
        if reason:
            raise DraftLinkError(reason)
        usable = [e for e in self.endpoints if e.connected and self._fits(e, total_tokens) and self._has_room(e)]
        if not usable:
            raise DraftLinkError("every draft server that fits the request holds its most sessions", full=True)
        # Least busy first; among equally busy ones, the least used so far, so sequential sessions alternate.
        endpoint = min(usable, key=lambda e: (e.live_sessions, e.sessions_opened))
        call = endpoint.stub.Speculate(metadata=self.metadata)
        endpoint.live_sessions += 1
        endpoint.sessions_opened += 1
        link = DraftLink(endpoint, call)
        endpoint.links.add(link)
        try:
            await link.send_start(dataclasses.replace(
                start, num_speculative_tokens=link.block_size(start.num_speculative_tokens)))
        except BaseException:  # a DraftLinkError, or the request cancelled meanwhile: the caller gets no link
            await link.close(cancel=True)
            raise
        return link
