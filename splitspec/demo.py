"""`make demo`: splitspec end to end on a synthetic pair, in one command.

Builds the demo pair when it is missing (`splitspec.demo_models`), starts the draft server pinned to some CPUs and
the target server on the others as two processes, streams a completion through the client SDK, then decodes the
same prompt without speculation and prints what speculation bought. Both servers are stopped on the way out,
Ctrl-C included.
"""

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

import torch
from splitspec_client import Client, InvalidArgumentError

from splitspec import demo_models
from splitspec.launch import split_cpus, start_draft, start_target, stop_all
from splitspec.topology import format_cpu_list

DEFAULT_PROMPT = "def parse_args(argv):\n    \"\"\"Parse the command line"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m splitspec.demo",
        description="Stream a completion through a draft server and a target server on this machine, and compare "
                    "it with target-only decoding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="Text to complete.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Tokens to generate.")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="Draft tokens per round (k).")
    parser.add_argument("--acceptance", type=float, default=0.9,
                        help="Expected greedy acceptance rate alpha of the demo pair (see splitspec-demo-models).")
    parser.add_argument("--models-dir", type=pathlib.Path, default=None,
                        help=f"Where demo pairs are cached. Default: {demo_models.default_cache_dir()}.")
    parser.add_argument("--device", default="auto", help="Target device: auto (cuda when present), cpu, cuda.")
    parser.add_argument("--tiny", action="store_true", help="Use a tiny pair (seconds; for tests).")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shape = "tiny" if args.tiny else "demo"
    low, high = demo_models.acceptance_range(demo_models.SHAPES[shape])
    if not low <= args.acceptance <= high:
        parser.error(f"--acceptance must be in [{low}, {high}] for the {shape} pair")
    directory = args.models_dir / demo_models.pair_name(shape, args.acceptance) if args.models_dir else None
    pair = demo_models.ensure_pair(args.acceptance, shape, directory)
    print(f"Synthetic pair (random weights, so the text is token salad): {pair.directory}")
    target_on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    draft_cpus, target_cpus = split_cpus(sorted(os.sched_getaffinity(0)), target_on_gpu)
    print(f"Starting the draft server on CPUs {format_cpu_list(draft_cpus)} and the target server on CPUs "
          f"{format_cpu_list(target_cpus)} ...", flush=True)
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="splitspec-demo-"))
    servers = []
    try:
        servers.append(start_draft(pair.draft_dir, draft_cpus, log_dir))
        servers.append(start_target(pair.target_dir, servers[0].address, target_cpus, log_dir, device=args.device))
        with Client(servers[1].address, timeout=600) as client:
            _run(client, args)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except InvalidArgumentError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    except Exception:
        for server in servers:
            print(f"--- {server.module} log ---\n{server.log()[-4000:]}", file=sys.stderr)
        raise
    finally:
        stop_all(servers)
        if servers:
            print("Servers stopped.")
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def _run(client: Client, args) -> None:
    params = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    # One short request each way first: the first forward passes of a fresh process are slow.
    client.generate(args.prompt, max_new_tokens=4, num_speculative_tokens=args.num_speculative_tokens)
    client.generate(args.prompt, max_new_tokens=4, num_speculative_tokens=0)

    print(f"\n--- splitspec, {args.num_speculative_tokens} draft tokens per round ---\n{args.prompt}", end="",
          flush=True)
    started = time.perf_counter()
    stats, token_ids = None, []
    for chunk in client.stream(args.prompt, num_speculative_tokens=args.num_speculative_tokens, **params):
        print(chunk.text, end="", flush=True)
        token_ids += chunk.token_ids
        stats = chunk.stats or stats
    speculative_s = time.perf_counter() - started
    print("\n---\nDecoding the same prompt with the target alone, for comparison ...", flush=True)
    started = time.perf_counter()
    alone = client.generate(args.prompt, num_speculative_tokens=0, **params)
    alone_s = time.perf_counter() - started

    speculative_rate = len(token_ids) / speculative_s
    alone_rate = len(alone.token_ids) / alone_s
    same = "yes" if tuple(token_ids) == alone.token_ids else "NO"
    print(f"acceptance rate       {stats.acceptance_rate:.2f}  ({stats.num_accepted_tokens} of "
          f"{stats.num_draft_tokens} draft tokens accepted)")
    print(f"mean accepted length  {stats.mean_accepted_length:.2f}  (tokens per verification round, bonus included)")
    print(f"tokens/s              {speculative_rate:.1f} with splitspec, {alone_rate:.1f} target-only")
    print(f"speedup               {speculative_rate / alone_rate:.2f}x over target-only decoding "
          f"(same tokens: {same})")
    if stats.fallback_reason:
        print(f"note: the target fell back to target-only decoding: {stats.fallback_reason}")


if __name__ == "__main__":
    sys.exit(main())
