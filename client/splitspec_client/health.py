"""Ask a splitspec server (target or draft) whether it serves, through the standard gRPC health service.

    python -m splitspec_client.health 127.0.0.1:50051 && echo serving
    python -m splitspec_client.health 127.0.0.1:50051 --tls-ca ca.pem --tls-server-name gpu-box

Exit status 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, unreachable, no answer in time, a TLS file
that cannot be read): what a container HEALTHCHECK or a readiness probe expects. Needs no torch.

The TLS options default to environment variables (SPLITSPEC_HEALTH_TLS_CA, SPLITSPEC_HEALTH_TLS_CERT,
SPLITSPEC_HEALTH_TLS_KEY, SPLITSPEC_HEALTH_TLS_SERVER_NAME), so that a container's fixed HEALTHCHECK command can probe
a server that serves TLS.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._tls import add_tls_options, channel_credentials

ENVIRONMENT_PREFIX = "SPLITSPEC_HEALTH_"


def check(
    address: str,
    service: str = "",
    timeout: float = 5.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> str:
    """The health status name ("SERVING", "NOT_SERVING", ...) that the server at `address` reports for `service`
    ("" is the whole server); raises grpc.RpcError when it cannot be asked. `credentials` connects with TLS;
    `server_name` is the name the server's certificate must carry, when it is not the host of `address` (a probe of
    127.0.0.1 on a server whose certificate names its host)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel:
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
    add_tls_options(parser, ENVIRONMENT_PREFIX)
    server_name_variable = f"{ENVIRONMENT_PREFIX}TLS_SERVER_NAME"
    parser.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=os.environ.get(server_name_variable) or None,
        help="name the server's certificate must carry, when not the host of HOST:PORT "
        f"(environment: {server_name_variable})",
    )
    args = parser.parse_args(argv)
    try:
        credentials = channel_credentials(args)
    except ValueError as err:
        print(f"{args.address}: {err}", file=sys.stderr)
        return 1
    if args.tls_server_name and credentials is None:
        parser.error("--tls-server-name needs TLS: give --tls-ca, or --tls-cert and --tls-key")
    try:
        status = check(args.address, args.service, args.timeout, credentials, args.tls_server_name)
    except grpc.RpcError as err:
        print(f"{args.address}: {err.code().name}: {err.details() or 'no details'}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
