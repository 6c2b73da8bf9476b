"""Ask a splitspec server (target or draft) whether it serves, through the standard gRPC health service.

    python -m splitspec_client.health 127.0.0.1:50051 && echo serving

Exit status 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, unreachable, no answer in time): what a
container HEALTHCHECK or a readiness probe expects. Needs no torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 5.0) -> str:
    """The health status name ("SERVING", "NOT_SERVING", ...) that the server at `address` reports for `service`
    ("" is the whole server); raises grpc.RpcError when it cannot be asked."""
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitspec_client.health",
        description="Exit 0 when the server's gRPC health service answers SERVING, else 1.",
    )
    parser.add_argument("address", metavar="HOST:PORT", help="server address, e.g. 127.0.0.1:50051")
    parser.add_argument(
        "--service", default="", help="service to ask about, e.g. splitspec.v1.TargetService (default: the server)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="deadline (default: 5)")
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as err:
        print(f"{args.address}: {err.code().name}: {err.details() or 'no details'}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
