"""`splitspec-target`: the target server, front door for clients. Verifies blocks from draft servers."""

import argparse
import asyncio
import logging
import math
import sys

from splitspec import server_cli
from splitspec.server_cli import add_common_flags

log = logging.getLogger("splitspec.target")
PROG = "splitspec-target"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a target model (GPU, else CPU) with speculative decoding against CPU draft servers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Hugging Face causal LM: a local directory or a hub id.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer directory or hub id. Default: --model.")
    parser.add_argument("--draft", action="append", default=[], metavar="HOST:PORT",
                        help="A draft server; repeat for several (sessions go to the least busy connected one). "
                             "None: the target decodes alone, with the same output.")
    add_common_flags(parser, default_port=50051)
    parser.add_argument("--draft-tls-ca", default=None, help="PEM CA of the draft servers' certificates: use TLS.")
    parser.add_argument("--draft-tls-cert", default=None,
                        help="PEM client certificate presented to draft servers (mutual TLS).")
    parser.add_argument("--draft-tls-key", default=None, help="PEM private key of --draft-tls-cert.")
    parser.add_argument("--draft-auth-token-file", default=None,
                        help="File holding the bearer token draft servers require (their --auth-token-file).")
    parser.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Weights dtype. auto: bfloat16 on GPUs that support it (else float16), float32 on CPU.")
    parser.add_argument("--num-speculative-tokens", type=int, default=4,
                        help="Draft tokens per verification round, when a request does not say.")
    parser.add_argument("--max-num-speculative-tokens", type=int, default=16,
                        help="Largest num_speculative_tokens a request may ask for.")
    parser.add_argument("--draft-ahead", action=argparse.BooleanOptionalAction, default=True,
                        help="Let draft servers draft the next block while the target verifies the current one, on "
                             "the guess that it is fully accepted (where their recent acceptance makes that likely); "
                             "used without a round trip when the guess holds.")
    parser.add_argument("--num-speculative-tokens-schedule", default="constant",
                        choices=["constant", "heuristic", "goodput"],  # block_size.SCHEDULES, without torch
                        help="Each session's block sizes, up to the request's num_speculative_tokens. constant: that "
                             "many every round. heuristic: +2 after a fully accepted block, -1 otherwise (as "
                             "transformers' assisted generation). goodput: the size with the most expected tokens per "
                             "second from the session's acceptance and measured round costs, 0 (target-only, probing "
                             "again later) when speculation does not pay; profiles the target's forwards at start-up.")
    parser.add_argument("--adaptive-num-speculative-tokens", dest="num_speculative_tokens_schedule",
                        action="store_const", const="heuristic", default=argparse.SUPPRESS,
                        help="Same as --num-speculative-tokens-schedule heuristic (kept for existing deployments).")
    parser.add_argument("--no-adaptive-num-speculative-tokens", dest="num_speculative_tokens_schedule",
                        action="store_const", const="constant", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    parser.add_argument("--speculation-backoff-running", type=int, default=0,
                        help="Back off under load: half-size blocks above half this many running requests, no "
                             "speculation above it. 0: never back off.")
    parser.add_argument("--batch-regroup-fraction", type=float, default=0.1,
                        help="After a forward pass, wait up to this fraction of its time for its sessions to hand "
                             "over their next forward, so that they share one batch again (not for sessions waiting "
                             "on their draft block). 0: start each forward with whoever is ready.")
    parser.add_argument("--draft-timeout", type=float, default=10.0,
                        help="Seconds to wait for a draft block before the session falls back to target-only "
                             "(less once a probe finds that draft unreachable: its sessions stop waiting then).")
    parser.add_argument("--draft-probe-interval", type=float, default=2.0,
                        help="Seconds between health probes (Info) of each connected draft server; a failed one is "
                             "probed again after this, doubling up to --draft-max-backoff.")
    parser.add_argument("--draft-max-backoff", type=float, default=30.0,
                        help="Longest wait, in seconds, between probes of a draft server that keeps failing.")
    parser.add_argument("--max-draft-reopens", type=int, default=2,
                        help="Times a request may move to another (or a recovered) draft server after its draft "
                             "session fails, before it finishes on the target alone.")
    parser.add_argument("--max-concurrent-requests", type=int, default=128,
                        help="Requests decoded at once; more wait (see --max-waiting-requests).")
    parser.add_argument("--max-waiting-requests", type=int, default=128,
                        help="Requests that may wait for a slot; beyond that, new ones get RESOURCE_EXHAUSTED at once.")
    parser.add_argument("--max-input-tokens", type=int, default=None,
                        help="Longest prompt accepted, in tokens (RESOURCE_EXHAUSTED beyond). Default: the model's "
                             "context.")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help="Largest prompt + max_new_tokens accepted (RESOURCE_EXHAUSTED beyond). Default: the "
                             "model's context.")
    parser.add_argument("--max-stop-sequences", type=int, default=16, help="Most stop strings a request may give.")
    parser.add_argument("--threads", type=int, default=None, help="Torch intra-op threads (CPU target).")
    return parser


def flags_problem(args) -> str | None:
    """What is wrong with the flags, or None."""
    def seconds(value: float) -> bool:
        return value > 0 and math.isfinite(value)

    return server_cli.flags_problem(args, [
        (0 <= args.batch_regroup_fraction <= 1, "--batch-regroup-fraction must be in [0, 1]"),
        (0 <= args.num_speculative_tokens <= args.max_num_speculative_tokens,
         "--num-speculative-tokens must be in [0, --max-num-speculative-tokens]"),
        (args.max_concurrent_requests >= 1, "--max-concurrent-requests must be at least 1"),
        (args.max_waiting_requests >= 0, "--max-waiting-requests must be 0 or more"),
        (seconds(args.draft_timeout), "--draft-timeout must be a number of seconds above 0"),
        (seconds(args.draft_probe_interval), "--draft-probe-interval must be a number of seconds above 0"),
        (seconds(args.draft_max_backoff), "--draft-max-backoff must be a number of seconds above 0"),
        (args.max_draft_reopens >= 0, "--max-draft-reopens must be 0 or more"),
        (args.max_input_tokens is None or args.max_input_tokens >= 1, "--max-input-tokens must be at least 1"),
        (args.max_total_tokens is None or args.max_total_tokens >= 2,
         "--max-total-tokens must be at least 2 (a prompt token and a new one)"),
        (args.max_stop_sequences >= 0, "--max-stop-sequences must be 0 or more"),
    ])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from splitspec.grpc_server import configure_logging

    configure_logging(args.log_level, args.log_format)
    from splitspec.security import ClientSecurity
    from splitspec.server_cli import error, load_security

    # Settings are checked before the model loads, which can take minutes (the model and addresses come after).
    if problem := flags_problem(args):
        return error(PROG, problem)
    try:
        security = load_security(args)
        draft_security = ClientSecurity.from_files(args.draft_tls_ca, args.draft_tls_cert, args.draft_tls_key,
                                                   args.draft_auth_token_file)
    except ValueError as exc:
        return error(PROG, exc)
    from splitspec import models

    try:
        device = models.resolve_device(args.device)
        dtype = models.resolve_dtype(args.dtype, device)
    except (ValueError, RuntimeError) as exc:
        return error(PROG, exc)
    return asyncio.run(_serve(args, security, draft_security, device, dtype))


async def _serve(args, security, draft_security, device, dtype) -> int:
    import torch
    from prometheus_client import CollectorRegistry

    from splitspec import models
    from splitspec.grpc_server import ListenError
    from splitspec.metrics import TargetMetrics
    from splitspec.server_cli import build_runner, build_server, cannot_listen, error
    from target_server.admission import Admission
    from target_server.block_size import measure_verify_profile
    from target_server.draft_pool import DraftPool
    from target_server.engine import TargetEngine
    from target_server.request import Limits, max_prompt_chars
    from target_server.servicer import TargetServicer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = models.load_causal_lm(args.model, device, dtype)
    except (OSError, ValueError) as exc:
        return error(PROG, f"--model {args.model}: cannot load it: {exc}")
    try:
        tokenizer = models.load_tokenizer(args.tokenizer or args.model, required=True)
    except (OSError, ValueError, TypeError) as exc:
        return error(PROG, f"--tokenizer {args.tokenizer or args.model}: cannot load it: {exc}")
    vocabulary = models.vocabulary_of(model, tokenizer)
    registry = CollectorRegistry()
    try:
        server = build_server(args, registry, security)
    except ListenError as exc:
        return cannot_listen(PROG, exc)
    pool = DraftPool(args.draft, vocabulary, probe_interval_s=args.draft_probe_interval,
                     max_backoff_s=args.draft_max_backoff, security=draft_security,
                     max_message_bytes=args.max_message_bytes)
    await pool.start()
    runner = build_runner(model, log)
    verify_profile = None
    if args.num_speculative_tokens_schedule == "goodput":
        longest = args.max_num_speculative_tokens + 1
        context = max(1, min(64, models.max_context_tokens(model) - longest))  # a short-context model still fits
        verify_profile = measure_verify_profile(runner, longest, context_tokens=context)
        log.info("target forward by tokens fed (goodput schedule): %s", verify_profile.describe())
    engine = TargetEngine(runner, tokenizer, vocabulary, pool, args.draft_timeout,
                          max_draft_reopens=args.max_draft_reopens,
                          admission=Admission(args.max_concurrent_requests, args.max_waiting_requests),
                          metrics=TargetMetrics(registry), draft_ahead=args.draft_ahead,
                          num_speculative_tokens_schedule=args.num_speculative_tokens_schedule,
                          verify_profile=verify_profile,
                          speculation_backoff_running=args.speculation_backoff_running,
                          max_batch_size=args.max_num_seqs, max_batch_tokens=args.max_num_batched_tokens,
                          batch_regroup_fraction=args.batch_regroup_fraction)
    engine.metrics.num_requests_running.set_function(lambda: engine.admission.running)
    engine.metrics.num_requests_waiting.set_function(lambda: engine.admission.waiting)
    limits = Limits(
        vocab_size=vocabulary.vocab_size,
        max_context_tokens=models.max_context_tokens(model),
        num_speculative_tokens=args.num_speculative_tokens,
        max_num_speculative_tokens=args.max_num_speculative_tokens,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        max_stop_sequences=args.max_stop_sequences,
        max_prompt_chars=max_prompt_chars(tokenizer, models.max_context_tokens(model)),
    )
    servicer = TargetServicer(engine, limits, args.model, str(dtype).removeprefix("torch."))
    server.add_service("splitspec.v1.TargetService", servicer)

    async def on_stop():
        await pool.close()
        engine.shutdown()

    await server.run(grace_s=args.shutdown_grace, on_stop=on_stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
