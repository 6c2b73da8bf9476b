"""The `splitspec` command: generate text with a target server, or ask what it runs.

    splitspec generate "Once upon a time" --target gpu-box:50051 --temperature 0.8 --seed 1
    splitspec info --json
    splitspec loadtest --concurrency 8 --total 200 --stream --max-new-tokens 64 --json report.json

Exit status: 0 on success, 2 for arguments to fix: refused here (a value the request cannot carry, an unreadable
file) or by the server (INVALID_ARGUMENT, FAILED_PRECONDITION), 1 for any other failure (retrying may help).
`loadtest` exits 1 when any of its requests failed (the status codes are in its report).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence

import grpc

from . import loadtest
from ._request import build_generate_request
from ._tls import add_tls_options, channel_credentials
from .client import Client
from .errors import SplitspecError
from .types import GenerationStats, TargetInfo

DEFAULT_TARGET = "localhost:50051"
_REQUEST_ERROR_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
DEFAULT_LOADTEST_PROMPT = "The quick brown fox"
DEFAULT_LOADTEST_TOTAL = 100
# What the request's integer fields carry (target.proto, common.proto); the server checks what the values mean.
INT32 = (-(2**31), 2**31 - 1)
UINT64 = (0, 2**64 - 1)


class _ArgumentError(Exception):
    """A bad argument found before any call: printed as `error: ...`, exit status 2."""


def _connection_options(default_timeout: float | None) -> argparse.ArgumentParser:
    # Built per call so that SPLITSPEC_TARGET is read when the command runs.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--target",
        default=os.environ.get("SPLITSPEC_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"target server address (default: $SPLITSPEC_TARGET, else {DEFAULT_TARGET})",
    )
    connection.add_argument(
        "--timeout",
        type=_positive(float),
        default=default_timeout,
        metavar="SECONDS",
        help=f"deadline of each call (default: {default_timeout or 'none'})",
    )
    add_tls_options(connection)
    connection.add_argument("--token-file", metavar="FILE", default=os.environ.get("SPLITSPEC_TOKEN_FILE"),
                            help="file holding the bearer token the server requires "
                                 "(default: $SPLITSPEC_TOKEN_FILE)")
    return connection


def _connect(args: argparse.Namespace) -> Client:
    try:
        credentials = channel_credentials(args)
    except ValueError as err:
        raise _ArgumentError(err) from None
    metadata = ()
    if args.token_file:
        try:
            token = pathlib.Path(args.token_file).read_text().strip()
        except OSError as err:
            raise _ArgumentError(f"--token-file: {err}") from None
        metadata = (("authorization", f"Bearer {token}"),)
    return Client(args.target, timeout=args.timeout, credentials=credentials, metadata=metadata)


def _add_generation_params(parser: argparse.ArgumentParser) -> list[str]:
    """Add the generation parameters; returns their destination names. They stay None (unset) unless given, so
    that the SDK's defaults apply: those are defined in one place."""
    params = parser.add_argument_group("generation parameters")
    param_actions = [
        params.add_argument(
            "--max-new-tokens", type=_integer(*INT32), metavar="N", help="tokens to generate at most (default: 64)"
        ),
        params.add_argument("--temperature", type=float, metavar="T", help="0 decodes greedily (default: 0)"),
        params.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1] (default: 1)"),
        params.add_argument(
            "--top-k", type=_integer(*INT32), metavar="K", help="keep the K likeliest tokens, 0 all (default: 0)"
        ),
        params.add_argument(
            "--seed", type=_integer(*UINT64), metavar="S", help="seed for reproducible sampling (default: random)"
        ),
        params.add_argument(
            "--stop", action="append", metavar="STR", help="stop when the text contains STR (repeatable)"
        ),
        params.add_argument(
            "--ignore-eos", action="store_true", default=None, help="keep generating after an end-of-sequence token"
        ),
        params.add_argument(
            "--num-speculative-tokens",
            type=_integer(*INT32),
            metavar="K",
            help="draft tokens per verification round; 0 turns speculation off (default: the server's)",
        ),
    ]
    return [action.dest for action in param_actions]


def build_parser() -> argparse.ArgumentParser:
    connection = _connection_options(default_timeout=None)
    json_output = argparse.ArgumentParser(add_help=False)
    json_output.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    parser = argparse.ArgumentParser(
        prog="splitspec", description="Client of a splitspec target server (speculative decoding over gRPC)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        parents=[connection, json_output],
        help="generate a completion",
        description="Generate a completion; the text is streamed to stdout, a stats summary goes to stderr.",
    )
    generate.add_argument("prompt", help="prompt text")
    generate.add_argument(
        "--no-stream", action="store_true", help="wait for the whole completion instead of streaming it"
    )
    generate.set_defaults(run=_generate, param_names=_add_generation_params(generate))

    info = commands.add_parser(
        "info",
        parents=[connection, json_output],
        help="show what a target server runs",
        description="Show the target's model, device, vocabulary, speculation settings and its draft servers.",
    )
    info.set_defaults(run=_info)

    _add_loadtest_parser(commands)
    return parser


def _add_loadtest_parser(commands) -> None:
    loadtest_parser = commands.add_parser(
        "loadtest",
        parents=[_connection_options(default_timeout=60.0)],
        help="load-test a target server",
        description="Send concurrent requests to one target server and report requests/s, latency, time to first "
        "token and inter-token latency (p50/p90/p99), tokens/s and status codes. Progress goes to stderr.",
    )
    prompts = loadtest_parser.add_argument_group("prompts (sent in turn)")
    prompts.add_argument(
        "--prompt", action="append", metavar="TEXT", help=f"a prompt; repeatable (default: {DEFAULT_LOADTEST_PROMPT!r})"
    )
    prompts.add_argument("--prompt-file", metavar="FILE", help="prompts, one per line (blank lines are skipped)")
    load = loadtest_parser.add_argument_group("load")
    load.add_argument(
        "--concurrency", type=_positive(int), default=4, metavar="N", help="requests in flight at most (default: 4)"
    )
    length = load.add_mutually_exclusive_group()
    length.add_argument(
        "--total", type=_positive(int), metavar="N", help=f"requests to send (default: {DEFAULT_LOADTEST_TOTAL})"
    )
    length.add_argument(
        "--duration",
        type=_positive(float),
        metavar="SECONDS",
        help="send requests for this long instead; those in flight then finish",
    )
    load.add_argument(
        "--rate",
        type=_positive(float),
        metavar="RPS",
        help="start requests on a fixed schedule of RPS per second; one whose start time passed while --concurrency "
        "requests were in flight starts as soon as one ends (default: as fast as --concurrency allows)",
    )
    load.add_argument(
        "--stream",
        action="store_true",
        help="call GenerateStream, which measures time to first token and inter-token latency (default: Generate)",
    )
    loadtest_parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the report as JSON to FILE; without FILE, print it instead of the text report",
    )
    loadtest_parser.set_defaults(run=_loadtest, param_names=_add_generation_params(loadtest_parser))


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _integer(low: int, high: int):
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value

    parse.__name__ = "int"
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Generated text holds any character: a terminal or a file in another encoding (a Windows code page, a Latin-1
    # locale) shows "?" for what it cannot hold, rather than a traceback in the middle of the completion.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        with _connect(args) as client:
            return args.run(client, args)
    except _ArgumentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SplitspecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if err.code in _REQUEST_ERROR_CODES else 1
    except KeyboardInterrupt:
        # Leaving the stream has already cancelled the request on the server.
        return 130


def _params(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in args.param_names if getattr(args, name) is not None}


def _generate(client: Client, args: argparse.Namespace) -> int:
    params = _params(args)
    try:
        # Built once before the call: what the SDK refuses (a prompt that is not valid text) is an argument error.
        build_generate_request(args.prompt, **params)
    except (TypeError, ValueError) as err:
        raise _ArgumentError(err) from None
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


def _loadtest(client: Client, args: argparse.Namespace) -> int:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as lines:
                from_file = [line.rstrip("\n") for line in lines if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise _ArgumentError(f"--prompt-file: {err}") from None
        if not from_file:
            raise _ArgumentError(f"--prompt-file: no prompts in {args.prompt_file}")
        prompts += from_file
    total = args.total if args.total is not None or args.duration is not None else DEFAULT_LOADTEST_TOTAL
    try:
        # The plan builds a request from each prompt: what the SDK refuses is an argument error.
        plan = loadtest.LoadPlan(
            prompts=tuple(prompts or [DEFAULT_LOADTEST_PROMPT]),
            params=_params(args),
            concurrency=args.concurrency,
            total=total,
            duration_s=args.duration,
            rate=args.rate,
            stream=args.stream,
        )
    except (TypeError, ValueError) as err:
        raise _ArgumentError(err) from None
    progress = _ProgressLine(sys.stderr, total)
    report = loadtest.LoadRun(client, plan).run(on_progress=progress.update)
    progress.close()
    report = {"target": args.target, "call": "GenerateStream" if plan.stream else "Generate",
              "concurrency": plan.concurrency, "total": plan.total, "duration_s": plan.duration_s,
              "rate": plan.rate, **report}
    if args.json is not None:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as out:
                out.write(text + "\n")
    if args.json != "-":
        print(f"{report['call']} on {args.target}, concurrency {plan.concurrency}")
        print(loadtest.format_report(report))
    return 0 if report["errors"] == 0 else 1


class _ProgressLine:
    """One status line on stderr: rewritten in place on a terminal, else printed every few seconds."""

    def __init__(self, stream, total: int | None, log_interval_s: float = 5.0):
        self._stream = stream
        self._total = total
        self._tty = stream.isatty()
        self._log_interval_s = log_interval_s
        self._last_logged = 0.0
        self._line = ""

    def update(self, progress: loadtest.Progress) -> None:
        done = f"{progress.done}/{self._total}" if self._total else str(progress.done)
        rate = progress.done / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
        self._line = (f"[{progress.elapsed_s:6.1f} s] {done} done, {progress.in_flight} in flight, "
                      f"{progress.failed} failed, {rate:.1f} req/s")
        if self._tty:
            self._stream.write("\r" + self._line + "\x1b[K")
            self._stream.flush()
        elif progress.elapsed_s - self._last_logged >= self._log_interval_s:
            self._last_logged = progress.elapsed_s
            print(self._line, file=self._stream, flush=True)

    def close(self) -> None:
        """End with the final state on its own line."""
        self._stream.write(("\r" + self._line + "\x1b[K\n") if self._tty else (self._line + "\n"))
        self._stream.flush()
