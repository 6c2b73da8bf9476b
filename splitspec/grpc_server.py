"""Server bootstrap shared by both halves: aio server, health, reflection, and the one wrapper every RPC runs in.

The wrapper is where a call gets its status: a request that does not parse becomes INVALID_ARGUMENT (grpcio would
answer UNKNOWN), a domain error its own code, anything else INTERNAL (logged: it is a bug). It also checks the
caller against the server's security policy and counts every call by method and status code.
"""

import asyncio
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitspec.errors import InvalidArgument, SplitspecError, Unavailable
from splitspec.metrics import RpcMetrics
from splitspec.security import ServerSecurity

log = logging.getLogger(__name__)

# Larger than gRPC's 4 MiB default: a block of sampled draft distributions can exceed it with a large vocabulary.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# After the grace period: how long cancelled handlers get to release their sessions.
HANDLER_EXIT_S = 5.0

# A call cancelled with less than this left before its deadline ran out of time: the server's deadline is the
# client's plus the request's transit, so the client's own deadline may fire (and cancel the call) a moment earlier.
DEADLINE_SLACK_S = 0.05


class ListenError(OSError):
    """An address the server cannot listen on. `transient` when another process holds it (an old instance still
    draining), which a restart may outlast; otherwise the address is wrong and restarting cannot help."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def _is_socket_path(host: str) -> bool:
    return host.startswith(("unix:", "unix-abstract:"))


def listen_address(host: str, port: int) -> str:
    """grpc's address for `host` and `port`: a Unix socket address as it is, an IPv6 literal in brackets."""
    if _is_socket_path(host):
        return host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def unix_socket_path(host: str) -> str | None:
    """The path of a `unix:PATH` or `unix://PATH` address; None for any other address."""
    if not host.startswith("unix:"):
        return None
    path = host.removeprefix("unix:")
    return path[2:] if path.startswith("//") else path


def bare_host(host: str) -> str:
    """`host` without the brackets an IPv6 literal may come in (`[::1]`), as sockets take it."""
    return host.removeprefix("[").removesuffix("]")


def _listen_error(address: str, host: str, port: int) -> ListenError:
    """Why grpc could not bind `address`, found by binding it the same way (grpc logs the reason but raises
    without it)."""
    try:
        if (path := unix_socket_path(host)) is not None:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.bind(path)
            os.unlink(path)  # ours: binding created it
        elif not _is_socket_path(host):
            family, kind, protocol, _, sockaddr = socket.getaddrinfo(
                bare_host(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does
                probe.bind(sockaddr)
    except OSError as exc:
        return ListenError(f"cannot listen on {address}: {exc.strerror or exc}",
                           transient=exc.errno == errno.EADDRINUSE)
    return ListenError(f"cannot listen on {address} (gRPC's log says why)", transient=True)


@dataclasses.dataclass(frozen=True)
class MalformedRequest:
    """What a request that does not parse deserializes to, so the call can answer INVALID_ARGUMENT."""

    type_name: str
    error: str

    def as_error(self) -> InvalidArgument:
        return InvalidArgument("request", f"not a valid {self.type_name}: {self.error}")


def _tolerant_parser(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, str(exc))

    return parse


async def _checked_stream(requests):
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise request.as_error()
        yield request


class _Call:
    """Status bookkeeping of one RPC: authorization, error mapping, metrics."""

    def __init__(self, server: "GrpcServer", method: str, context):
        self.server, self.method, self.context = server, method, context
        self.code = "OK"
        self.started = time.perf_counter()
        server.call_started(self)

    def admit(self, request, client_streaming: bool):
        """Check the caller and the request; returns the request, its stream checked message by message."""
        if self.server.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if self.server.security is not None:
            self.server.security.authorize(self.context)
        if isinstance(request, MalformedRequest):
            raise request.as_error()
        return _checked_stream(request) if client_streaming else request

    def cancelled(self) -> None:
        """The call ended before its handler: grpc cancels the handler alike whether the client cancelled the call
        or its deadline passed; the deadline tells them apart (the client saw DEADLINE_EXCEEDED)."""
        remaining = self.context.time_remaining()
        self.code = "DEADLINE_EXCEEDED" if remaining is not None and remaining < DEADLINE_SLACK_S else "CANCELLED"

    async def fail(self, exc: Exception) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            self.code = (self.context.code() or grpc.StatusCode.UNKNOWN).name
            return
        if isinstance(exc, SplitspecError):
            self.code = exc.code.name
            await self.context.abort(exc.code, exc.message)
        log.exception("internal error in %s", self.method)
        self.code = "INTERNAL"
        await self.context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def done(self) -> None:
        self.server.call_finished(self)
        if self.server.rpc_metrics is not None:
            self.server.rpc_metrics.observe(self.method, self.code, time.perf_counter() - self.started)


@dataclasses.dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive pings from the server on connections with calls in flight, so that a peer gone without
    closing its connection (a host that hung, lost power or was cut off; a stopped process) ends its calls within
    `time_s + timeout_s`: a draft session whose target vanished frees its slot, a request whose client vanished
    stops. Pings go out only after `time_s` without anything read on a connection, so busy ones carry none."""

    time_s: float = 30.0
    timeout_s: float = 10.0

    def options(self) -> list[tuple[str, int]]:
        time_ms, timeout_ms = round(self.time_s * 1000), round(self.timeout_s * 1000)
        return [
            ("grpc.keepalive_time_ms", time_ms),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            # grpc core closes a connection for an unanswered ping after this; with the keepalive timeout alone
            # (grpcio 1.85) a stopped peer's calls lived on until its process ended.
            ("grpc.http2.ping_timeout_ms", timeout_ms),
            ("grpc.http2.max_pings_without_data", 0),  # a session waiting on its peer sends no data
            ("grpc.http2.min_sent_ping_interval_without_data_ms", time_ms),
        ]


class GrpcServer:
    """An aio server with the standard health and reflection services, stopped gracefully on SIGTERM/SIGINT: health
    answers NOT_SERVING and new calls UNAVAILABLE while the calls in flight finish.

    `host` is an interface to listen on (an IPv6 literal with or without brackets), or a whole Unix domain socket
    address (`unix:///path/to.sock`, then `port` is not used): `splitspec.LLM` reaches the draft server it starts
    that way. Health and reflection stay open to every caller (probes and ghz use them); the splitspec services obey
    `security`.
    """

    def __init__(self, host: str, port: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 security: ServerSecurity | None = None, rpc_metrics: RpcMetrics | None = None,
                 keepalive: Keepalive | None = None):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            *(keepalive.options() if keepalive is not None else []),
        ]
        self.security = security
        self.rpc_metrics = rpc_metrics
        self.server = grpc.aio.server(options=options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = [health.SERVICE_NAME]
        self.address = listen_address(host, port)
        credentials = security.server_credentials() if security is not None else None
        # The bound port, or 1 for a Unix socket. grpcio reports a failure by raising RuntimeError (older releases
        # returned 0), naming the address but not the reason: ask the OS for that.
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(self.address)
            else:
                self.port = self.server.add_secure_port(self.address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise _listen_error(self.address, host, port)
        if not _is_socket_path(host):
            self.address = listen_address(host, self.port)
        # The calls our handlers are serving: shutdown waits for them, and refuses new ones once `draining`.
        self.calls: set[_Call] = set()
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = asyncio.Event()

    def call_started(self, call: _Call) -> None:
        self.calls.add(call)
        self._idle.clear()

    def call_finished(self, call: _Call) -> None:
        self.calls.discard(call)
        if not self.calls:
            self._idle.set()

    def add_service(self, full_name: str, servicer) -> None:
        """Serve `servicer`'s methods for the service `full_name` (its generated module must be imported)."""
        service = descriptor_pool.Default().FindServiceByName(full_name)
        handlers = {method.name: self._handler(service, method, servicer) for method in service.methods}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name, handlers),))
        self.service_names.append(full_name)

    def _handler(self, service, method, servicer):
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        implementation = getattr(servicer, method.name)
        name = f"/{service.full_name}/{method.name}"
        if method.server_streaming:
            async def streaming(request, context):
                call = _Call(self, name, context)
                responses = None
                try:
                    request = call.admit(request, method.client_streaming)
                    responses = implementation(request, context)
                    async for response in responses:
                        yield response
                except (asyncio.CancelledError, GeneratorExit):
                    call.cancelled()
                    raise
                except Exception as exc:  # noqa: BLE001 - every outcome gets its status here
                    await call.fail(exc)
                    raise
                finally:
                    # A stream cancelled while grpc sends a response leaves this generator at its `yield`, closed
                    # later by the event loop; the servicer's generator is closed here, with the call, not after.
                    if responses is not None:
                        await responses.aclose()
                    call.done()

            make, function = (grpc.stream_stream_rpc_method_handler if method.client_streaming
                              else grpc.unary_stream_rpc_method_handler), streaming
        else:
            async def unary(request, context):
                call = _Call(self, name, context)
                try:
                    request = call.admit(request, method.client_streaming)
                    return await implementation(request, context)
                except asyncio.CancelledError:
                    call.cancelled()
                    raise
                except Exception as exc:  # noqa: BLE001
                    await call.fail(exc)
                    raise
                finally:
                    call.done()

            make, function = (grpc.stream_unary_rpc_method_handler if method.client_streaming
                              else grpc.unary_unary_rpc_method_handler), unary
        return make(function, request_deserializer=_tolerant_parser(request_class),
                    response_serializer=response_class.SerializeToString)

    async def _set_status(self, status) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self) -> None:
        reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME], self.server)
        await self.server.start()
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s", self.address)

    async def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING and new calls UNAVAILABLE while in-flight ones get up to `grace_s` to finish (`hurry`
        ends the wait), then cancel what is left and wait for the handlers to finish."""
        log.info("shutting down: health NOT_SERVING, new calls UNAVAILABLE, %d in flight get %.1fs to finish",
                 len(self.calls), grace_s)
        self.draining = True
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        if not await self._wait_idle(grace_s, hurry=True):
            log.warning("cancelling %d calls still in flight", len(self.calls))
        await self.server.stop(0)
        # Cancelled handlers still release their sessions; an event loop closed under them logs each as an error.
        if not await self._wait_idle(HANDLER_EXIT_S):
            log.warning("%d call handlers did not finish within %.0fs of being cancelled", len(self.calls),
                        HANDLER_EXIT_S)

    def hurry(self) -> None:
        """Cut a running `stop`'s grace period short."""
        self._hurry.set()

    async def _wait_idle(self, timeout_s: float, hurry: bool = False) -> bool:
        """Wait until no call is in flight, for `timeout_s` at most (with `hurry`, only until `hurry()`); returns
        whether none is."""
        waits = [asyncio.ensure_future(self._idle.wait())]
        if hurry:
            waits.append(asyncio.ensure_future(self._hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._idle.is_set()

    async def run(self, grace_s: float = 10.0, on_stop=None) -> None:
        """Serve until SIGTERM/SIGINT, then stop gracefully; a second signal cancels the calls in flight at once
        (signal handlers need the main thread's loop; a server on another thread's loop calls `start` and `stop`
        itself)."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                log.warning("%s again: cancelling the calls in flight now", sig.name)
                self.hurry()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await stop.wait()
        await self.stop(grace_s)
        if on_stop is not None:
            await on_stop()
        log.info("stopped")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, log_format: str = "text") -> None:
    """`text` for people, `json` (one object per line, with `request_id` where a request is concerned) for log
    pipelines."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
