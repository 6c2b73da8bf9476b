"""The `splitspec` command: generate text with a target server, or ask what it runs.

    splitspec generate "Once upon a time" --target gpu-box:50051 --temperature 0.8 --seed 1
    splitspec info --json

Exit status: 0 on success, 2 when the server refuses the request as given (INVALID_ARGUMENT, FAILED_PRECONDITION:
fix the arguments), 1 for any other failure (retrying may help).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import grpc

from .client import Client
from .errors import SplitspecError
from .types import GenerationStats, TargetInfo

DEFAULT_TARGET = "localhost:50051"
_REQUEST_ERROR_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def build_parser() -> argparse.ArgumentParser:
    # Built per call so that SPLITSPEC_TARGET is read when the command runs.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--target",
        default=os.environ.get("SPLITSPEC_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"target server address (default: $SPLITSPEC_TARGET, else {DEFAULT_TARGET})",
    )
    connection.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline of the call (default: none)")
    connection.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    parser = argparse.ArgumentParser(
        prog="splitspec", description="Client of a splitspec target server (speculative decoding over gRPC)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        parents=[connection],
        help="generate a completion",
        description="Generate a completion; the text is streamed to stdout, a stats summary goes to stderr.",
    )
    generate.add_argument("prompt", help="prompt text")
    generate.add_argument(
        "--no-stream", action="store_true", help="wait for the whole completion instead of streaming it"
    )
    # Left unset (None) unless given, so that the SDK's defaults apply: they are defined in one place.
    params = generate.add_argument_group("generation parameters")
    param_actions = [
        params.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate at most (default: 64)"),
        params.add_argument("--temperature", type=float, metavar="T", help="0 decodes greedily (default: 0)"),
        params.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1] (default: 1)"),
        params.add_argument("--top-k", type=int, metavar="K", help="keep the K likeliest tokens, 0 all (default: 0)"),
        params.add_argument("--seed", type=int, metavar="S", help="seed for reproducible sampling (default: random)"),
        params.add_argument(
            "--stop", action="append", metavar="STR", help="stop when the text contains STR (repeatable)"
        ),
        params.add_argument(
            "--ignore-eos", action="store_true", default=None, help="keep generating after an end-of-sequence token"
        ),
        params.add_argument(
            "--num-speculative-tokens",
            type=int,
            metavar="K",
            help="draft tokens per verification round; 0 turns speculation off (default: the server's)",
        ),
    ]
    generate.set_defaults(run=_generate, param_names=[action.dest for action in param_actions])

    info = commands.add_parser(
        "info",
        parents=[connection],
        help="show what a target server runs",
        description="Show the target's model, device, vocabulary, speculation settings and its draft servers.",
    )
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.target, timeout=args.timeout) as client:
            return args.run(client, args)
    except SplitspecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if err.code in _REQUEST_ERROR_CODES else 1
    except KeyboardInterrupt:
        # Leaving the stream has already cancelled the request on the server.
        return 130


def _generate(client: Client, args: argparse.Namespace) -> int:
    params = {name: getattr(args, name) for name in args.param_names if getattr(args, name) is not None}
    finish_reason, stats = None, None
    if args.json or args.no_stream:
        result = client.generate(args.prompt, **params)
        if args.json:
            print(json.dumps(dataclasses.asdict(result)))
            return 0
        print(result.text)
        finish_reason, stats = result.finish_reason, result.stats
    else:
        for chunk in client.stream(args.prompt, **params):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            finish_reason, stats = chunk.finish_reason, chunk.stats
        sys.stdout.write("\n")
    if stats is not None:
        print(_summary(finish_reason, stats), file=sys.stderr)
    return 0


def _summary(finish_reason: str | None, stats: GenerationStats) -> str:
    tokens_per_s = stats.generated_tokens / stats.total_time_s if stats.total_time_ns else 0.0
    summary = (
        f"[{finish_reason}] {stats.generated_tokens} tokens in {stats.total_time_s:.2f} s"
        f" ({tokens_per_s:.1f} tokens/s), TTFT {stats.time_to_first_token_s * 1e3:.0f} ms,"
        f" acceptance rate {stats.acceptance_rate:.2f}, mean accepted length {stats.mean_accepted_length:.2f}"
    )
    if stats.fallback_reason:
        summary += f", speculation off: {stats.fallback_reason}"
    return summary


def _info(client: Client, args: argparse.Namespace) -> int:
    info = client.info()
    if args.json:
        print(json.dumps(dataclasses.asdict(info)))
    else:
        print(_describe(info))
    return 0


def _describe(info: TargetInfo) -> str:
    vocabulary = info.vocabulary
    lines = [
        f"model: {info.model} ({info.dtype} on {info.device})",
        f"vocabulary: {vocabulary.vocab_size} tokens, eos {list(vocabulary.eos_token_ids)},"
        f" tokenizer {vocabulary.tokenizer_fingerprint or 'none'}",
        f"max context tokens: {info.max_context_tokens}",
        f"num speculative tokens: {info.num_speculative_tokens} (max {info.max_num_speculative_tokens})",
        f"live sessions: {info.live_sessions}",
        f"draft servers: {len(info.draft_servers) or 'none'}",
    ]
    for server in info.draft_servers:
        state = f"connected, {server.model}, {server.live_sessions} live sessions" if server.connected else server.error
        lines.append(f"  {server.address}: {state}")
    return "\n".join(lines)
