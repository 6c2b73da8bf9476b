"""The floor under a round's orchestration overhead: a bare grpcio-asyncio bidirectional stream round trip (64
bytes each way, echoed) between two processes pinned like the draft and the target server. `make bench` reports it
beside the rounds' overhead.

    python -m splitspec.bench.grpc_rtt serve --cpus 0          # prints its port
    python -m splitspec.bench.grpc_rtt client PORT --cpus 1    # prints {"p50_ms": ..., "p95_ms": ...}
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import grpc

METHOD = "/splitspec.bench.Echo/Stream"
MESSAGES = 300
WARM_UP = 20


def _identity(data: bytes) -> bytes:
    return data


async def _serve() -> None:
    async def echo(requests, context):
        async for request in requests:
            yield request

    handler = grpc.method_handlers_generic_handler(
        "splitspec.bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo, _identity, _identity)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _client(port: int, messages: int) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)()
        times = []
        for _ in range(messages + WARM_UP):
            started = time.perf_counter_ns()
            await call.write(b"x" * 64)
            await call.read()
            times.append(time.perf_counter_ns() - started)
        await call.done_writing()
    times = sorted(times[WARM_UP:])
    return {"p50_ms": round(statistics.median(times) / 1e6, 3), "p95_ms": round(times[int(0.95 * len(times))] / 1e6, 3),
            "messages": messages}


def measure(server_cpus: list[int], client_cpus: list[int], messages: int = MESSAGES) -> dict:
    """Round-trip p50/p95 in ms, the echo server pinned to `server_cpus` and the client to `client_cpus`."""
    module = [sys.executable, "-m", "splitspec.bench.grpc_rtt"]
    server = subprocess.Popen([*module, "serve", "--cpus", ",".join(map(str, server_cpus))], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = server.stdout.readline().strip()
        if not port:
            raise RuntimeError("the echo server did not start")
        client = subprocess.run([*module, "client", port, "--cpus", ",".join(map(str, client_cpus)),
                                 "--messages", str(messages)], capture_output=True, text=True, timeout=120, check=True)
        return {**json.loads(client.stdout), "server_cpus": server_cpus, "client_cpus": client_cpus}
    finally:
        server.kill()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitspec.bench.grpc_rtt", description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["serve", "client"])
    parser.add_argument("port", nargs="?", type=int)
    parser.add_argument("--cpus", default=None, help="Comma-separated CPUs to pin this process to.")
    parser.add_argument("--messages", type=int, default=MESSAGES)
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, [int(cpu) for cpu in args.cpus.split(",")])  # before gRPC starts its threads
    if args.role == "serve":
        asyncio.run(_serve())
    else:
        print(json.dumps(asyncio.run(_client(args.port, args.messages))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
