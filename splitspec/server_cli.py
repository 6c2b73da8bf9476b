"""Command-line flags both servers share (listening, security, metrics, limits, batching, logging, shutdown), and
the start-up checks on them: each problem is one `PROG: error: ...` line, and exit status 2 unless a restart may
outlast it."""

import argparse
import errno
import math
import sys

from splitspec.grpc_server import DEFAULT_MAX_MESSAGE_BYTES

# Below this even a health answer or an Info response may not fit; grpc takes a C int.
MIN_MESSAGE_BYTES = 1024
MAX_MESSAGE_BYTES = 2**31 - 1
MAX_KEEPALIVE_S = 86400.0  # a day; grpc takes milliseconds as a C int


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {text}")
    return port


port_number.__name__ = "port"  # argparse names the type in its error messages


def add_common_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="0.0.0.0",
                        help="Address to listen on: IPv4, IPv6 (:: or [::]), a host name, or unix:///PATH for a Unix "
                             "domain socket (then --port is unused).")
    parser.add_argument("--port", type=port_number, default=default_port,
                        help="Port to listen on (0 picks a free one and logs it).")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS instead of plaintext.")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert.")
    parser.add_argument("--tls-client-ca", default=None,
                        help="PEM CA: require client certificates it signed (mutual TLS).")
    parser.add_argument("--allowed-client-names", default=None,
                        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
                        help="Comma-separated certificate names (CN or SAN) allowed to call; others get "
                             "PERMISSION_DENIED. Needs --tls-client-ca.")
    parser.add_argument("--auth-token-file", default=None,
                        help="File holding a bearer token every call must carry (metadata 'authorization: Bearer "
                             "<token>'); others get UNAUTHENTICATED. Health and reflection stay open.")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help=f"Largest gRPC message received or sent ({MIN_MESSAGE_BYTES} at least); larger ones get "
                             "RESOURCE_EXHAUSTED.")
    parser.add_argument("--metrics-port", type=port_number, default=None,
                        help="Serve Prometheus metrics on http://--metrics-host:PORT/metrics (0 picks a free port). "
                             "Default: no metrics endpoint.")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="Address of the metrics endpoint (:: or [::] for "
                                                                  "IPv6).")
    parser.add_argument("--max-num-seqs", type=int, default=64,
                        help="Most sessions in one forward pass of the model (continuous batching); 1 turns batching "
                             "off.")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096,
                        help="Most tokens, padding included, in one forward pass (a longer prompt still runs, alone).")
    parser.add_argument("--keepalive-time", type=float, default=30.0,
                        help="Seconds without anything read on a connection with calls in flight before the server "
                             "pings the peer (HTTP/2 keepalive), so that calls of a peer gone without closing its "
                             "connection (a hung or unplugged host) end: a draft session frees its slot, a request "
                             "stops. 0 turns the pings off.")
    parser.add_argument("--keepalive-timeout", type=float, default=10.0,
                        help="Seconds a keepalive ping may go unanswered before the connection and its calls end.")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="On SIGTERM: seconds in-flight requests get to finish (new ones get UNAVAILABLE); a "
                             "second SIGTERM or Ctrl-C cancels them at once. A service manager's stop timeout must "
                             "exceed it.")
    parser.add_argument("--log-level", default="info", help="Logging level.")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line, with request_id, for log pipelines.")


def common_flags_problem(args) -> str | None:
    """What is wrong with the shared flags, or None."""
    if args.max_num_seqs < 1 or args.max_num_batched_tokens < 1:
        return "--max-num-seqs and --max-num-batched-tokens must be at least 1"
    if not MIN_MESSAGE_BYTES <= args.max_message_bytes <= MAX_MESSAGE_BYTES:
        return f"--max-message-bytes must be in [{MIN_MESSAGE_BYTES}, {MAX_MESSAGE_BYTES}]"
    if not (args.shutdown_grace >= 0 and math.isfinite(args.shutdown_grace)):
        return "--shutdown-grace must be a number of seconds, 0 or more"
    if not (0 <= args.keepalive_time <= MAX_KEEPALIVE_S and (args.keepalive_time == 0 or args.keepalive_time >= 0.001)):
        return f"--keepalive-time must be 0 (off) or a number of seconds in [0.001, {MAX_KEEPALIVE_S}]"
    if not 0.001 <= args.keepalive_timeout <= MAX_KEEPALIVE_S:
        return f"--keepalive-timeout must be a number of seconds in [0.001, {MAX_KEEPALIVE_S}]"
    return None


def flags_problem(args, checks: list[tuple[bool, str]]) -> str | None:
    """The first problem of the shared flags, then of a server's own `checks` (whether each holds, and the problem
    when it does not), or None."""
    return common_flags_problem(args) or next((problem for holds, problem in checks if not holds), None)


def error(prog: str, message, status: int = 2) -> int:
    """Say what went wrong in one line; returns the exit status: 2 for a problem restarting cannot fix (the systemd
    units do not restart after it), 1 for one it may outlast."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def cannot_listen(prog: str, exc) -> int:
    """Exit status 1 when the address is in use, maybe by an old instance still draining, which a restart may
    outlast; 2 when it is wrong."""
    return error(prog, exc, 1 if exc.transient else 2)


def load_security(args):
    """The server's TLS and token settings, their files read and checked (ValueError says which flag is wrong)."""
    from splitspec.security import ServerSecurity

    return ServerSecurity.from_files(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file,
                                     args.allowed_client_names)


def build_runner(model, log):
    """The model's runner: batched over a KV pool when the model allows it (else one cache per session, logged)."""
    from splitspec.kv_pool import runner_for

    runner, problem = runner_for(model)
    if problem:
        log.warning("one session per forward pass: cannot batch this model (%s)", problem)
    return runner


def build_server(args, registry, security):
    """The GrpcServer the flags describe, with its metrics endpoint started when asked for. Raises ListenError when
    an address cannot be listened on."""
    from splitspec.grpc_server import GrpcServer, Keepalive, ListenError, bare_host, listen_address
    from splitspec.metrics import RpcMetrics, serve_metrics

    keepalive = Keepalive(args.keepalive_time, args.keepalive_timeout) if args.keepalive_time else None
    server = GrpcServer(args.host, args.port, max_message_bytes=args.max_message_bytes, security=security,
                        rpc_metrics=RpcMetrics(registry), keepalive=keepalive)
    if args.metrics_port is not None:
        metrics_host = bare_host(args.metrics_host)
        try:
            serve_metrics(registry, metrics_host, args.metrics_port)
        except OSError as exc:
            raise ListenError(f"metrics endpoint: cannot listen on {listen_address(metrics_host, args.metrics_port)}: "
                              f"{exc.strerror or exc}", transient=exc.errno == errno.EADDRINUSE) from exc
    return server
