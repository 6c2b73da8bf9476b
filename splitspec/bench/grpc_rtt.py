"""The floor under a round's orchestration overhead: a bare grpcio-asyncio bidirectional stream round trip (64
bytes each way, echoed) between two processes pinned like the draft and the target server. `make bench` reports it
beside the rounds' overhead, twice: back to back, and after each side sat idle for IDLE_MS, as in a round (each half
waits while the other computes). Waking an idle process costs time of its own: on the 2-vCPU VM of this repo's
measurements, 0.26 ms back to back became about 0.7 ms after 30 ms idle, and a plain asyncio TCP echo showed the
same (0.17 -> 0.44 ms).

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
IDLE_MESSAGES = 100
IDLE_MS = 20.0
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


async def _round_trips(call, messages: int, idle_s: float) -> list[int]:
    times = []
    for _ in range(messages + WARM_UP):
        if idle_s:
            await asyncio.sleep(idle_s)
        started = time.perf_counter_ns()
        await call.write(b"x" * 64)
        await call.read()
        times.append(time.perf_counter_ns() - started)
    return sorted(times[WARM_UP:])


async def _client(port: int, messages: int, idle_messages: int) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)()
        times = await _round_trips(call, messages, 0.0)
        idle_times = await _round_trips(call, idle_messages, IDLE_MS / 1e3) if idle_messages else [0]
        await call.done_writing()
    return {"p50_ms": round(statistics.median(times) / 1e6, 3), "p95_ms": round(times[int(0.95 * len(times))] / 1e6, 3),
            "messages": messages, "idle_ms": IDLE_MS, "idle_p50_ms": round(statistics.median(idle_times) / 1e6, 3),
            "idle_messages": idle_messages}


def measure(server_cpus: list[int], client_cpus: list[int], messages: int = MESSAGES,
            idle_messages: int = IDLE_MESSAGES) -> dict:
    """Round-trip p50/p95 in ms back to back, and p50 after IDLE_MS idle, the echo server pinned to `server_cpus`
    and the client to `client_cpus`."""
    module = [sys.executable, "-m", "splitspec.bench.grpc_rtt"]
    server = subprocess.Popen([*module, "serve", "--cpus", ",".join(map(str, server_cpus))], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = server.stdout.readline().strip()
        if not port:
            raise RuntimeError("the echo server did not start")
        client = subprocess.run([*module, "client", port, "--cpus", ",".join(map(str, client_cpus)),
                                 "--messages", str(messages), "--idle-messages", str(idle_messages)],
                                capture_output=True, text=True, timeout=120, check=True)
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
    parser.add_argument("--idle-messages", type=int, default=IDLE_MESSAGES,
                        help=f"Round trips timed after {IDLE_MS:g} ms idle each.")
    args = parser.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, [int(cpu) for cpu in args.cpus.split(",")])  # before gRPC starts its threads
    if args.role == "serve":
        asyncio.run(_serve())
    else:
        print(json.dumps(asyncio.run(_client(args.port, args.messages, args.idle_messages))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
