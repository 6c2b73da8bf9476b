"""Prometheus metrics: what both halves export, and the endpoint that serves them.

Names follow vLLM's where vLLM has one (`spec_decode_num_drafts`, `time_to_first_token_seconds`, ...), under the
`splitspec:` prefix as vLLM uses `vllm:`. Each server owns a registry, so tests can run several in one process.
"""

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RpcMetrics:
    """Requests by method and final status code (errors are the codes other than OK), and their duration."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("splitspec:rpc_requests", "RPCs served, by method and gRPC status code",
                                ["method", "code"], registry=registry)
        self.duration = Histogram("splitspec:rpc_duration_seconds", "Time from RPC start to its status",
                                  ["method"], buckets=LATENCY_BUCKETS_S, registry=registry)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.duration.labels(method).observe(seconds)


class BatchMetrics:
    """Sessions (rows) and tokens per forward pass of one model worker (splitspec.batcher)."""

    def __init__(self, registry: CollectorRegistry, prefix: str, half: str, regroups: bool = False):
        """`regroups`: the worker holds forwards back to regroup sessions (the target's; --batch-regroup-fraction),
        which a counter of that time then reports."""
        self.batch_size = Histogram(f"splitspec:{prefix}batch_size", f"Sessions (rows) per {half} forward pass",
                                    buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.batch_tokens = Histogram(f"splitspec:{prefix}iteration_tokens_total",
                                      f"Tokens fed per {half} forward pass, padding excluded",
                                      buckets=BATCH_TOKENS_BUCKETS, registry=registry)
        self.regroup_wait = Counter(f"splitspec:{prefix}batch_regroup_wait_seconds",
                                    f"Time the {half}'s model worker held a forward pass back for the sessions of the "
                                    f"previous one to return (--batch-regroup-fraction)",
                                    registry=registry) if regroups else None
        self.kv_cache_bytes = Gauge(f"splitspec:{prefix}kv_cache_bytes",
                                    f"Bytes the {half}'s KV pool holds (slots x the longest sequence; 0 when idle)",
                                    registry=registry)

    def record_batch(self, num_rows: int, num_tokens: int) -> None:
        self.batch_size.observe(num_rows)
        self.batch_tokens.observe(num_tokens)

    def record_regroup_wait(self, seconds: float) -> None:
        self.regroup_wait.inc(seconds)

    def watch(self, runner) -> None:
        """Report `runner`'s KV pool size (a runner without a pool, one cache per session, reports 0)."""
        pool = getattr(runner, "pool", None)
        self.kv_cache_bytes.set_function(lambda: pool.nbytes if pool is not None else 0)


class TargetMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.time_to_first_token = Histogram("splitspec:time_to_first_token_seconds", "Request arrival to first token",
                                             buckets=LATENCY_BUCKETS_S, registry=registry)
        self.inter_token_latency = Histogram("splitspec:inter_token_latency_seconds",
                                             "Time between tokens (a round's time shared by the tokens it produced)",
                                             buckets=LATENCY_BUCKETS_S, registry=registry)
        self.e2e_request_latency = Histogram("splitspec:e2e_request_latency_seconds", "Request arrival to last token",
                                             buckets=LATENCY_BUCKETS_S, registry=registry)
        self.num_requests_running = Gauge("splitspec:num_requests_running", "Requests decoding now",
                                          registry=registry)
        self.num_requests_waiting = Gauge("splitspec:num_requests_waiting", "Requests waiting for a slot (queue)",
                                          registry=registry)
        self.num_drafts = Counter("splitspec:spec_decode_num_drafts", "Candidate blocks verified", registry=registry)
        self.num_draft_tokens = Counter("splitspec:spec_decode_num_draft_tokens", "Draft tokens verified",
                                        registry=registry)
        self.num_accepted_tokens = Counter("splitspec:spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                           registry=registry)
        self.num_accepted_tokens_per_pos = Counter("splitspec:spec_decode_num_accepted_tokens_per_pos",
                                                   "Draft tokens accepted, by position in the block", ["position"],
                                                   registry=registry)
        # Counted as the tokens are processed, as vLLM counts them: a request cancelled or timed out midway counts
        # too, as its rounds do in spec_decode_* (generation tokens = accepted + one per round, bar the cut last one).
        self.generation_tokens = Counter("splitspec:generation_tokens", "Tokens generated", registry=registry)
        self.prompt_tokens = Counter("splitspec:prompt_tokens", "Prompt tokens processed", registry=registry)
        self.draft_wait = Histogram("splitspec:draft_wait_seconds", "Per request: time spent waiting for draft blocks",
                                    buckets=LATENCY_BUCKETS_S, registry=registry)
        self.verify_time = Histogram("splitspec:verify_time_seconds", "Per request: target forward time",
                                     buckets=LATENCY_BUCKETS_S, registry=registry)
        self.draft_fallback_requests = Counter("splitspec:draft_fallback_requests",
                                               "Requests whose draft session failed at least once (they finished "
                                               "on another draft or on the target alone)", registry=registry)
        self.decode_rounds = Counter("splitspec:decode_rounds",
                                     "Decoding rounds by kind: speculative (a draft block verified) or target_only "
                                     "(no draft server, a failed draft, k = 0 asked, or speculation switched off by "
                                     "the block-size schedule or the load back-off)", ["kind"], registry=registry)
        self.batches = BatchMetrics(registry, "", "target", regroups=True)

    def record_block(self, num_draft_tokens: int, accepted_len: int) -> None:
        self.num_drafts.inc()
        self.num_draft_tokens.inc(num_draft_tokens)
        self.num_accepted_tokens.inc(accepted_len)
        for position in range(accepted_len):
            self.num_accepted_tokens_per_pos.labels(str(position)).inc()

    def record_first_tokens(self, num_prompt_tokens: int, num_tokens: int, seconds: float) -> None:
        """A request's first round: its prompt processed, its first `num_tokens` out `seconds` after it arrived."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_tokens)
        self.time_to_first_token.observe(seconds)

    def record_inter_token(self, num_tokens: int, seconds: float) -> None:
        """A round after the first produced `num_tokens` in `seconds`: each token's share is its latency."""
        self.generation_tokens.inc(num_tokens)
        for _ in range(num_tokens):
            self.inter_token_latency.observe(seconds / num_tokens)

    def record_finish(self, stats) -> None:
        self.e2e_request_latency.observe(stats.total_time_ns / 1e9)
        self.draft_wait.observe(stats.draft_wait_ns / 1e9)
        self.verify_time.observe(stats.verify_ns / 1e9)
        # Not `fallback_reason`: a request that waited for a full draft, or was refused by one, has one too.
        if stats.draft_failures:
            self.draft_fallback_requests.inc()


class DraftMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.live_sessions = Gauge("splitspec:draft_live_sessions", "Draft sessions open now", registry=registry)
        self.blocks = Counter("splitspec:draft_blocks", "Candidate blocks drafted", registry=registry)
        self.draft_tokens = Counter("splitspec:draft_tokens", "Draft tokens proposed", registry=registry)
        self.block_time = Histogram("splitspec:draft_block_seconds",
                                    "Draft model time per candidate block (its forward passes, which other "
                                    "sessions' tokens may share)", buckets=LATENCY_BUCKETS_S, registry=registry)
        self.batches = BatchMetrics(registry, "draft_", "draft")

    def record_block(self, num_tokens: int, seconds: float) -> None:
        self.blocks.inc()
        self.draft_tokens.inc(num_tokens)
        self.block_time.observe(seconds)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve /metrics over HTTP on a daemon thread; returns the bound port (port 0 picks one). `host`: an IPv6
    literal comes without brackets (grpc_server.bare_host)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, bound)
    return bound
