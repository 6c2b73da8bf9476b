"""Command-line flags both servers share (listening, security, metrics, limits, batching, logging, shutdown)."""

import argparse

from splitspec.grpc_server import DEFAULT_MAX_MESSAGE_BYTES


def add_common_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="0.0.0.0",
                        help="Address to listen on, or unix:///PATH for a Unix domain socket (then --port is unused).")
    parser.add_argument("--port", type=int, default=default_port,
                        help="Port to listen on (0 picks a free one and logs it).")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS instead of plaintext.")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert.")
    parser.add_argument("--tls-client-ca", default=None,
                        help="PEM CA: require client certificates it signed (mutual TLS).")
    parser.add_argument("--allowed-client-names", default=None, type=lambda text: text.split(","),
                        help="Comma-separated certificate names (CN or SAN) allowed to call; others get "
                             "PERMISSION_DENIED. Needs --tls-client-ca.")
    parser.add_argument("--auth-token-file", default=None,
                        help="File holding a bearer token every call must carry (metadata 'authorization: Bearer "
                             "<token>'); others get UNAUTHENTICATED. Health and reflection stay open.")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="Largest gRPC message received or sent; larger ones get RESOURCE_EXHAUSTED.")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Serve Prometheus metrics on http://--metrics-host:PORT/metrics (0 picks a free port). "
                             "Default: no metrics endpoint.")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="Address of the metrics endpoint.")
    parser.add_argument("--max-num-seqs", type=int, default=64,
                        help="Most sessions in one forward pass of the model (continuous batching); 1 turns batching "
                             "off.")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096,
                        help="Most tokens, padding included, in one forward pass (a longer prompt still runs, alone).")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="On SIGTERM: seconds in-flight requests get to finish (new ones get UNAVAILABLE).")
    parser.add_argument("--log-level", default="info", help="Logging level.")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line, with request_id, for log pipelines.")


def batching_flags_problem(args) -> str | None:
    if args.max_num_seqs < 1 or args.max_num_batched_tokens < 1:
        return "--max-num-seqs and --max-num-batched-tokens must be at least 1"
    return None


def build_runner(model, log):
    """The model's runner: batched over a KV pool when the model allows it (else one cache per session, logged)."""
    from splitspec.kv_pool import runner_for

    runner, problem = runner_for(model)
    if problem:
        log.warning("one session per forward pass: cannot batch this model (%s)", problem)
    return runner


def build_server(args, registry):
    """The GrpcServer the flags describe, with its metrics endpoint started when asked for."""
    from splitspec.grpc_server import GrpcServer
    from splitspec.metrics import RpcMetrics, serve_metrics
    from splitspec.security import ServerSecurity

    security = ServerSecurity.from_files(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file,
                                         args.allowed_client_names)
    server = GrpcServer(args.host, args.port, max_message_bytes=args.max_message_bytes, security=security,
                        rpc_metrics=RpcMetrics(registry))
    if args.metrics_port is not None:
        serve_metrics(registry, args.metrics_host, args.metrics_port)
    return server
