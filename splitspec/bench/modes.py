"""`make bench`'s modes: the target server's performance options, compared on demo pairs, as ratios.

  pipelined vs sequential - the target started with --draft-ahead (its default) and with --no-draft-ahead: tokens/s,
                            speedup over target-only, and the share of blocks drafted ahead (num_drafts_ahead /
                            num_drafts), at k and at the adaptive comparison's larger k.
  adaptive vs fixed k     - the heuristic and goodput schedules (--num-speculative-tokens-schedule) against the
                            default constant one, a request asking for adaptive_k.
  concurrent streams      - aggregate tokens/s of 1, 2, 4, ... streams at once (one thread and one channel each,
                            `Client.generate` on different prompts), splitspec at k and target-only
                            (num_speculative_tokens=0) on the same server, and each one's ratio to one stream.
  deep-draft pipelining   - pipelined vs sequential again, on the deep-draft pairs (`demo_models.SHAPES`), where
                            drafting a block takes about as long as verifying it (k x draft step ~ verify, measured
                            from the sequential rounds): there drafting ahead has the most to hide.

Four target servers (one per flag set), all up at once, share the sweep's draft server; the deep-draft pairs get
a draft server of their own (they share its model: the draft's layers are never scaled) and two target servers
each. Every single-stream system runs a prompt before any runs the next, and each concurrency level times splitspec
and target-only back to back: the machine's load drifts, and falls alike on what is compared.
"""

import functools
import pathlib
import statistics
import threading
import time

from splitspec_client import Client

from splitspec import launch
from splitspec.bench import report, runs
from splitspec.topology import format_cpu_list

DEFAULTS = dict(acceptance=0.9, k=4, adaptive_k=8, concurrency=[1, 2, 4, 8], max_new_tokens=96, stream_tokens=64,
                deep_draft=dict(shape="demo-deep-draft", acceptances=[0.9, 0.95], ks=[3, 4]))
QUICK = dict(acceptance=0.9, k=4, adaptive_k=8, concurrency=[1, 2], max_new_tokens=12, stream_tokens=12,
             deep_draft=dict(shape="tiny-deep-draft", acceptances=[0.9], ks=[2]))
SERVERS = {  # name: extra target flags
    "pipelined": ["--draft-ahead"],
    "sequential": ["--no-draft-ahead"],
    "adaptive": ["--draft-ahead", "--num-speculative-tokens-schedule", "heuristic"],
    "goodput": ["--draft-ahead", "--num-speculative-tokens-schedule", "goodput"],
}


def start_target(model_dir: str, draft_address: str, cpus: list[int], log_dir: pathlib.Path, name: str,
                 device: str = "cpu", dtype: str = "auto", log_name: str | None = None):
    """launch.start_target's server, with the mode's flags (its log: target-NAME.log unless `log_name`)."""
    return launch.start_target(model_dir, draft_address, cpus, log_dir, device=device, dtype=dtype,
                               extra_args=tuple(SERVERS[name]), name=log_name or f"target-{name}")


def run_modes(pair, draft_address: str, target_cpus: list[int], log_dir: pathlib.Path, prompts: list[list[int]],
              stream_prompts: list[list[int]], config: dict, progress, device: str = "cpu",
              dtype: str = "auto") -> dict:
    """The "modes" section of bench.json. `prompts` are timed one after another; `stream_prompts` (one per stream
    of the largest concurrency) at once. The target servers run on `device` (their host thread on
    `target_cpus`)."""
    k, adaptive_k, tokens = config["k"], config["adaptive_k"], config["max_new_tokens"]
    started = time.monotonic()
    servers, clients = {}, {}
    try:
        launch.start_together({name: functools.partial(start_target, pair.target_dir, draft_address, target_cpus,
                                                       log_dir, name, device, dtype)
                               for name in SERVERS}, servers)
        for name, server in servers.items():
            clients[name] = Client(server.address, timeout=600)
            runs.run_splitspec(clients[name], prompts[:1], 4, k)  # warm-up: a fresh process's first passes are slow
        progress(f"modes: {len(servers)} target servers up on {device}, CPUs {format_cpu_list(target_cpus)} "
                 f"({time.monotonic() - started:.0f}s)")

        systems = [("pipelined", 0), *[(name, block) for block in sorted({k, adaptive_k})
                                       for name in ("pipelined", "sequential")], ("adaptive", adaptive_k),
                   ("goodput", adaptive_k)]
        measured = runs.run_interleaved({(name, block): (clients[name], block) for name, block in systems}, prompts,
                                        tokens)
        for (name, block), run in measured.items():
            progress(f"modes: {name} {'target-only' if block == 0 else f'k={block}'}: {run.tokens_per_s:.1f} tok/s"
                     + (f", drafted ahead {run.num_drafts_ahead}/{run.num_drafts} blocks" if block else ""))
        baseline = measured["pipelined", 0]
        pipelining = [pipelining_row(block, measured["pipelined", block], measured["sequential", block], baseline)
                      for block in sorted({k, adaptive_k})]
        adaptive = adaptive_row(adaptive_k, measured["adaptive", adaptive_k], measured["pipelined", adaptive_k],
                                baseline)
        goodput = adaptive_row(adaptive_k, measured["goodput", adaptive_k], measured["pipelined", adaptive_k],
                               baseline)

        concurrency = []
        for streams in config["concurrency"]:
            spec = run_concurrent(servers["pipelined"].address, stream_prompts[:streams], config["stream_tokens"], k)
            alone = run_concurrent(servers["pipelined"].address, stream_prompts[:streams], config["stream_tokens"], 0)
            concurrency.append(concurrency_row(streams, spec, alone, concurrency[0] if concurrency else None))
            row = concurrency[-1]
            progress(f"modes: {streams} stream(s): splitspec {row['tokens_per_s']:.1f} tok/s, target-only "
                     f"{row['target_only_tokens_per_s']:.1f} tok/s")
    finally:
        for client in clients.values():
            client.close()
        launch.stop_all(list(servers.values()))
    return {
        "config": {**config, "prompts": len(prompts), "acceptance_knob": pair.acceptance,
                   "alpha_at_build": round(pair.measured_acceptance, 4)},
        "target_only_tokens_per_s": round(baseline.tokens_per_s, 2),
        "pipelining": pipelining,
        "adaptive": adaptive,  # the heuristic schedule
        "goodput": goodput,
        "concurrency": concurrency,
        "seconds": round(time.monotonic() - started, 1),
    }


def run_deep_draft(pairs: dict, draft_cpus: list[int], target_cpus: list[int], log_dir: pathlib.Path,
                   prompts: list[list[int]], config: dict, progress, device: str = "cpu", dtype: str = "auto") -> dict:
    """The "deep_draft" section of bench.json: a pipelining row per pair ({alpha knob: DemoPair}) and k, with how
    long the sequential rounds waited for their block against how long they verified it."""
    ks, tokens = config["deep_draft"]["ks"], config["max_new_tokens"]
    started = time.monotonic()
    rows = []
    first = next(iter(pairs.values()))
    draft = launch.start_draft(first.draft_dir, draft_cpus, log_dir, name="draft-deep")
    try:
        for acceptance, pair in pairs.items():
            servers, clients = {}, {}
            try:
                launch.start_together({name: functools.partial(
                    start_target, pair.target_dir, draft.address, target_cpus, log_dir, name, device, dtype,
                    log_name=f"target-deep-{acceptance:.2f}-{name}") for name in ("pipelined", "sequential")}, servers)
                for name, server in servers.items():
                    clients[name] = Client(server.address, timeout=600)
                    runs.run_splitspec(clients[name], prompts[:1], 4, ks[0])  # warm-up
                systems = {("pipelined", 0): (clients["pipelined"], 0)}
                for k in ks:
                    systems |= {(name, k): (clients[name], k) for name in ("pipelined", "sequential")}
                measured = runs.run_interleaved(systems, prompts, tokens)
            finally:
                for client in clients.values():
                    client.close()
                launch.stop_all(list(servers.values()))
            for k in ks:
                rows.append(deep_draft_row(acceptance, pair, k, measured["pipelined", k], measured["sequential", k],
                                           measured["pipelined", 0]))
                row = rows[-1]
                progress(f"deep-draft pipelining, alpha {acceptance:.2f} k={k}: pipelined "
                         f"{row['pipelined_tokens_per_s']:.1f} tok/s, sequential {row['sequential_tokens_per_s']:.1f}"
                         f" ({row['pipelined_over_sequential']:.2f}x); drafting {row['draft_wait_p50_ms']:.1f} ms vs "
                         f"verifying {row['verify_p50_ms']:.1f} ms per sequential round")
    finally:
        launch.stop_all([draft])
    return {"config": {**config["deep_draft"], "prompts": len(prompts), "max_new_tokens": tokens}, "rows": rows,
            "seconds": round(time.monotonic() - started, 1)}


def _median_ms(times_ns: list[int]) -> float:
    return statistics.median(times_ns) / 1e6 if times_ns else float("nan")  # NaN: no such round (a fallback)


def deep_draft_row(acceptance: float, pair, k: int, pipelined: runs.Run, sequential: runs.Run,
                   baseline: runs.Run) -> dict:
    # The rounds that drafted and verified a whole block of k (not the shorter ones at the end of each prompt)
    full = [size == k for size in sequential.round_num_draft_tokens]
    waited_ms = _median_ms([ns for ns, whole in zip(sequential.round_waited_draft_ns, full) if whole])
    verify_ms = _median_ms(sequential.verify_ns_with_block(k))
    return {"acceptance_knob": acceptance, "alpha_at_build": round(pair.measured_acceptance, 4),
            "draft_wait_p50_ms": round(waited_ms, 2), "verify_p50_ms": round(verify_ms, 2),
            "draft_over_verify": round(waited_ms / verify_ms, 3),
            **pipelining_row(k, pipelined, sequential, baseline)}


def _drafted_ahead(run: runs.Run) -> float:
    return round(run.num_drafts_ahead / max(1, run.num_drafts), 3)


def pipelining_row(k: int, pipelined: runs.Run, sequential: runs.Run, baseline: runs.Run) -> dict:
    sequential_rounds, pipelined_rounds = report.round_breakdown(sequential), report.round_breakdown(pipelined)
    return {
        "k": k,
        "pipelined_tokens_per_s": round(pipelined.tokens_per_s, 2),
        "sequential_tokens_per_s": round(sequential.tokens_per_s, 2),
        "pipelined_speedup": round(pipelined.tokens_per_s / baseline.tokens_per_s, 3),
        "sequential_speedup": round(sequential.tokens_per_s / baseline.tokens_per_s, 3),
        "pipelined_over_sequential": round(pipelined.tokens_per_s / sequential.tokens_per_s, 3),
        "num_drafts_ahead": pipelined.num_drafts_ahead,
        "num_drafts": pipelined.num_drafts,
        "drafted_ahead": _drafted_ahead(pipelined),
        "sequential_drafted_ahead": _drafted_ahead(sequential),
        "pipelined_alpha": round(pipelined.alpha, 4),
        "sequential_alpha": round(sequential.alpha, 4),
        # Exact there: every block of the sequential run is drafted after the verdict it follows.
        "sequential_overhead_p50_ms": sequential_rounds["overhead_p50_ms"],
        "sequential_overhead_p95_ms": sequential_rounds["overhead_p95_ms"],
        "pipelined_overhead_p50_ms": pipelined_rounds["overhead_p50_ms"],
        # The target's own part (neither verifying nor waiting for a block), exact in both modes.
        "pipelined_target_overhead_p50_ms": pipelined_rounds["target_overhead_p50_ms"],
        "sequential_target_overhead_p50_ms": sequential_rounds["target_overhead_p50_ms"],
        "same_tokens_as_baseline": pipelined.token_ids == sequential.token_ids == baseline.token_ids,
        "fallbacks": len(pipelined.fallback_reasons) + len(sequential.fallback_reasons),
    }


def adaptive_row(k: int, adaptive: runs.Run, fixed: runs.Run, baseline: runs.Run) -> dict:
    """An adaptive schedule (heuristic or goodput) at k against the constant one."""
    return {
        "k": k,
        "adaptive_tokens_per_s": round(adaptive.tokens_per_s, 2),
        "fixed_tokens_per_s": round(fixed.tokens_per_s, 2),
        "adaptive_speedup": round(adaptive.tokens_per_s / baseline.tokens_per_s, 3),
        "fixed_speedup": round(fixed.tokens_per_s / baseline.tokens_per_s, 3),
        "adaptive_over_fixed": round(adaptive.tokens_per_s / fixed.tokens_per_s, 3),
        # draft tokens per block: k when fixed (less only at the end), what the sizer chose when adaptive
        "adaptive_mean_block": round(adaptive.num_draft_tokens / max(1, adaptive.num_drafts), 2),
        "fixed_mean_block": round(fixed.num_draft_tokens / max(1, fixed.num_drafts), 2),
        "adaptive_acceptance_rate": round(adaptive.num_accepted_tokens / max(1, adaptive.num_draft_tokens), 4),
        "fixed_acceptance_rate": round(fixed.num_accepted_tokens / max(1, fixed.num_draft_tokens), 4),
        "adaptive_drafted_ahead": _drafted_ahead(adaptive),
        "adaptive_rounds_with_block": round(adaptive.num_drafts / max(1, adaptive.rounds), 3),
        "same_tokens_as_baseline": adaptive.token_ids == fixed.token_ids == baseline.token_ids,
        "fallbacks": len(adaptive.fallback_reasons),
    }


def run_concurrent(address: str, prompts: list[list[int]], max_new_tokens: int, k: int) -> dict:
    """Every prompt at once, one thread and one channel each; wall time from the common start to the last finish.
    Streamed, for each round's batch size (how many sessions shared its target forward pass)."""
    results: list = [None] * len(prompts)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts) + 1)
    clients = [Client(address, timeout=600) for _ in prompts]

    def stream(index: int) -> None:
        try:
            barrier.wait()
            results[index] = list(clients[index].stream(prompts[index], max_new_tokens=max_new_tokens,
                                                        num_speculative_tokens=k, ignore_eos=True))
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(index,), daemon=True) for index in range(len(prompts))]
    try:
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter_ns()
        for thread in threads:
            thread.join()
        wall_ns = time.perf_counter_ns() - started
    finally:
        for client in clients:
            client.close()
    if errors:
        raise errors[0]
    token_ids = [tuple(t for chunk in chunks for t in chunk.token_ids) for chunks in results]
    stats = [chunks[-1].stats for chunks in results]
    batch_sizes = [chunk.round_timing.batch_size for chunks in results for chunk in chunks]
    return {
        "wall_ns": wall_ns,
        "generated_tokens": sum(len(ids) for ids in token_ids),
        "token_ids": token_ids,
        "num_drafts": sum(s.num_drafts for s in stats),
        "num_drafts_ahead": sum(s.num_drafts_ahead for s in stats),
        "fallbacks": sum(bool(s.fallback_reason) for s in stats),
        "mean_batch_size": sum(batch_sizes) / len(batch_sizes),
    }


def concurrency_row(streams: int, spec: dict, alone: dict, first: dict | None) -> dict:
    tokens_per_s = spec["generated_tokens"] / (spec["wall_ns"] / 1e9)
    target_only = alone["generated_tokens"] / (alone["wall_ns"] / 1e9)
    first = first or {"tokens_per_s": tokens_per_s, "target_only_tokens_per_s": target_only}
    return {
        "streams": streams,
        "tokens_per_s": round(tokens_per_s, 2),
        "target_only_tokens_per_s": round(target_only, 2),
        "speedup": round(tokens_per_s / target_only, 3),
        "over_one_stream": round(tokens_per_s / first["tokens_per_s"], 3),
        "target_only_over_one_stream": round(target_only / first["target_only_tokens_per_s"], 3),
        "drafted_ahead": round(spec["num_drafts_ahead"] / max(1, spec["num_drafts"]), 3),
        # per round: sessions in the target forward pass that verified it
        "mean_batch_size": round(spec["mean_batch_size"], 2),
        "target_only_mean_batch_size": round(alone["mean_batch_size"], 2),
        "same_tokens_as_baseline": spec["token_ids"] == alone["token_ids"],
        "fallbacks": spec["fallbacks"],
    }


def table(modes: dict) -> str:
    """Markdown: the single-stream comparisons, then the concurrency levels."""
    config = modes["config"]
    lines = [f"modes at alpha knob {config['acceptance_knob']:.2f}, {config['prompts']} prompt(s) x "
             f"{config['max_new_tokens']} tokens; target-only {modes['target_only_tokens_per_s']:.1f} tok/s", "",
             "| mode | k | tok/s | speedup | ratio | blocks drafted ahead | mean block | overhead p50 ms/round | "
             "target's own p50 ms/round |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in modes["pipelining"]:
        lines.append(f"| pipelined (--draft-ahead) | {row['k']} | {row['pipelined_tokens_per_s']:.1f} | "
                     f"{row['pipelined_speedup']:.2f}x | {row['pipelined_over_sequential']:.2f}x sequential | "
                     f"{row['drafted_ahead']:.0%} ({row['num_drafts_ahead']}/{row['num_drafts']}) | - | "
                     f"<= {row['pipelined_overhead_p50_ms']:.2f} | {row['pipelined_target_overhead_p50_ms']:.2f} |")
        lines.append(f"| sequential (--no-draft-ahead) | {row['k']} | {row['sequential_tokens_per_s']:.1f} | "
                     f"{row['sequential_speedup']:.2f}x | 1.00x | {row['sequential_drafted_ahead']:.0%} | - | "
                     f"{row['sequential_overhead_p50_ms']:.2f} | {row['sequential_target_overhead_p50_ms']:.2f} |")
    for name in ("adaptive", "goodput"):
        row = modes[name]
        schedule = "heuristic" if name == "adaptive" else name
        lines.append(f"| {schedule} schedule | <= {row['k']} | {row['adaptive_tokens_per_s']:.1f} | "
                     f"{row['adaptive_speedup']:.2f}x | {row['adaptive_over_fixed']:.2f}x fixed | "
                     f"{row['adaptive_drafted_ahead']:.0%} | {row['adaptive_mean_block']:.1f} in "
                     f"{row['adaptive_rounds_with_block']:.0%} of rounds | - | - |")
    row = modes["adaptive"]  # the constant schedule both were compared with (one run)
    lines.append(f"| constant schedule (fixed k) | {row['k']} | {row['fixed_tokens_per_s']:.1f} | "
                 f"{row['fixed_speedup']:.2f}x | 1.00x | "
                 f"- | {row['fixed_mean_block']:.1f} | - | - |")
    if "deep_draft" in modes:
        lines += ["", deep_draft_table(modes["deep_draft"])]
    lines += ["", f"concurrent streams, {config['stream_tokens']} tokens each, k={config['k']}, draft-ahead on:", "",
              "| streams | splitspec tok/s (aggregate) | x one stream | sessions per target forward | "
              "target-only tok/s (aggregate) | x one stream | sessions per forward | splitspec / target-only |",
              "|---|---|---|---|---|---|---|---|"]
    for row in modes["concurrency"]:
        lines.append(f"| {row['streams']} | {row['tokens_per_s']:.1f} | {row['over_one_stream']:.2f}x | "
                     f"{row['mean_batch_size']:.1f} | {row['target_only_tokens_per_s']:.1f} | "
                     f"{row['target_only_over_one_stream']:.2f}x | {row['target_only_mean_batch_size']:.1f} | "
                     f"{row['speedup']:.2f}x |")
    return "\n".join(lines)


def deep_draft_table(deep_draft: dict) -> str:
    config = deep_draft["config"]
    lines = [f"pipelined vs sequential on the {config['shape']} pairs ({config['prompts']} prompt(s) x "
             f"{config['max_new_tokens']} tokens), where k x draft step ~ verify:", "",
             "| alpha knob | alpha | k | drafting / verifying (ms, p50 of sequential rounds) | pipelined tok/s | "
             "sequential tok/s | pipelined / sequential | blocks drafted ahead | speedup over target-only "
             "(pipelined, sequential) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in deep_draft["rows"]:
        lines.append(f"| {row['acceptance_knob']:.2f} | {row['pipelined_alpha']:.2f} | {row['k']} | "
                     f"{row['draft_wait_p50_ms']:.1f} / "
                     f"{row['verify_p50_ms']:.1f} ({row['draft_over_verify']:.2f}) | "
                     f"{row['pipelined_tokens_per_s']:.1f} | {row['sequential_tokens_per_s']:.1f} | "
                     f"{row['pipelined_over_sequential']:.2f}x | {row['drafted_ahead']:.0%} "
                     f"({row['num_drafts_ahead']}/{row['num_drafts']}) | {row['pipelined_speedup']:.2f}x, "
                     f"{row['sequential_speedup']:.2f}x |")
    return "\n".join(lines)
