"""Server bootstrap shared by both halves: aio server, health, reflection, and the one wrapper every RPC runs in.

The wrapper is where a call gets its status: a request that does not parse becomes INVALID_ARGUMENT (grpcio would
answer UNKNOWN), a domain error its own code, anything else INTERNAL (logged: it is a bug). It also checks the
caller against the server's security policy and counts every call by method and status code.
"""

import asyncio
import dataclasses
import json
import logging
import signal
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitspec.errors import InvalidArgument, SplitspecError
from splitspec.metrics import RpcMetrics
from splitspec.security import ServerSecurity

log = logging.getLogger(__name__)

# Larger than gRPC's 4 MiB default: a block of sampled draft distributions can exceed it with a large vocabulary.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


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

    def admit(self, request, client_streaming: bool):
        """Check the caller and the request; returns the request, its stream checked message by message."""
        if self.server.security is not None:
            self.server.security.authorize(self.context)
        if isinstance(request, MalformedRequest):
            raise request.as_error()
        return _checked_stream(request) if client_streaming else request

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
        if self.server.rpc_metrics is not None:
            self.server.rpc_metrics.observe(self.method, self.code, time.perf_counter() - self.started)


class GrpcServer:
    """An aio server with the standard health and reflection services, stopped gracefully on SIGTERM/SIGINT.

    `host` is an interface to listen on, or a whole Unix domain socket address (`unix:///path/to.sock`, then `port`
    is not used): `splitspec.LLM` reaches the draft server it starts that way. Health and reflection stay open to
    every caller (probes and ghz use them); the splitspec services obey `security`.
    """

    def __init__(self, host: str, port: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 security: ServerSecurity | None = None, rpc_metrics: RpcMetrics | None = None):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.security = security
        self.rpc_metrics = rpc_metrics
        self.server = grpc.aio.server(options=options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = [health.SERVICE_NAME]
        unix_socket = host.startswith("unix:")
        self.address = host if unix_socket else f"{host}:{port}"
        credentials = security.server_credentials() if security is not None else None
        # The bound port, or 1 for a Unix socket; 0 means the address could not be bound.
        if credentials is None:
            self.port = self.server.add_insecure_port(self.address)
        else:
            self.port = self.server.add_secure_port(self.address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address}")
        if not unix_socket:
            self.address = f"{host}:{self.port}"

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
                try:
                    request = call.admit(request, method.client_streaming)
                    async for response in implementation(request, context):
                        yield response
                except (asyncio.CancelledError, GeneratorExit):
                    call.code = "CANCELLED"
                    raise
                except Exception as exc:  # noqa: BLE001 - every outcome gets its status here
                    await call.fail(exc)
                    raise
                finally:
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
                    call.code = "CANCELLED"
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
        """Health NOT_SERVING, refuse new calls (UNAVAILABLE), let in-flight ones finish within `grace_s`."""
        log.info("shutting down (grace %.1fs)", grace_s)
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)

    async def run(self, grace_s: float = 10.0, on_stop=None) -> None:
        """Serve until SIGTERM/SIGINT, then stop gracefully (signal handlers need the main thread's loop; a server
        on another thread's loop calls `start` and `stop` itself)."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
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
