"""Server bootstrap shared by both halves: aio server, health, reflection, error mapping, graceful shutdown."""

import asyncio
import functools
import inspect
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitspec.errors import SplitspecError

log = logging.getLogger(__name__)

# Larger than gRPC's 4 MiB default: a block of sampled draft distributions can exceed it with a large vocabulary.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def rpc_errors(method):
    """Turns domain errors into their gRPC status; anything else is a bug, logged and sent as INTERNAL.

    Works on unary coroutines and on async-generator (streaming) handlers alike.
    """

    async def _abort(context, exc: Exception):
        if isinstance(exc, SplitspecError):
            await context.abort(exc.code, exc.message)
        log.exception("internal error in %s", method.__qualname__)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for response in method(self, request, context):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
                await _abort(context, exc)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)

    return unary_wrapper


class GrpcServer:
    """An aio server with the standard health and reflection services, stopped gracefully on SIGTERM/SIGINT."""

    def __init__(self, host: str, port: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = [health.SERVICE_NAME]
        self.address = f"{host}:{port}"
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address}")
        self.address = f"{host}:{self.port}"

    def add_service(self, full_name: str, add_to_server, servicer) -> None:
        add_to_server(servicer, self.server)
        self.service_names.append(full_name)

    async def _set_status(self, status) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def run(self, grace_s: float = 10.0, on_stop=None) -> None:
        """Serve until SIGTERM/SIGINT, then stop taking requests and let in-flight ones finish within `grace_s`."""
        reflection.enable_server_reflection([*self.service_names, reflection.SERVICE_NAME], self.server)
        await self.server.start()
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s", self.address)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down (grace %.1fs)", grace_s)
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)
        if on_stop is not None:
            await on_stop()
        log.info("stopped")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
