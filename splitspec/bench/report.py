"""From timed runs to the benchmark's rows, and the rows to a table, JSON and a plot.

Units: c (one draft step) and v(k) (one verify forward over k+1 positions) are in target decoding steps: the mean
verify forward of the baseline's rounds and of the rounds that verified a block of k, from each round's RoundTiming
(not the stats' verify time, which also counts each request's prefill: spread over a run's rounds it inflated both,
v(k) by up to 7% at k 8 where rounds are few).
  ideal            - Leviathan et al.'s E(alpha, k) / (k*c + v(k)): draft, then verify, nothing else.
  ideal overlapped - E(alpha, k) / max(v(k), k*c): drafting hidden behind verification, the bound that drafting
                     ahead (the target's default) works towards.
  overhead         - per round, from the RoundTiming the target streams with each chunk: the round's time minus its
                     verify forward minus the draft's compute for the block it waited for (gRPC, both event loops,
                     scheduling, bookkeeping). Exact for blocks drafted after the verdict; for a block drafted
                     ahead none of its drafting is subtracted, so the figure is an upper bound there.
"""

import json
import pathlib

import numpy as np

from splitspec.bench.runs import Run
from splitspec.speculative import expected_tokens_per_round, ideal_speedup


def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def round_breakdown(run: Run) -> dict:
    """Where a round's time goes, in ms: means, the overhead's p50/p95, and the p50 of the target's own part of it."""
    overhead = np.array(run.round_overhead_ns, dtype=float)
    return {
        "round_wall_ms": _ms(np.mean(run.round_ns)),
        "draft_compute_ms": _ms(np.mean(run.round_waited_draft_ns)),
        "verify_compute_ms": _ms(np.mean(run.round_verify_ns)),
        "draft_wait_ms": _ms(run.draft_wait_ns / run.rounds),
        "overhead_ms": _ms(overhead.mean()),
        "overhead_p50_ms": _ms(np.percentile(overhead, 50)),
        "overhead_p95_ms": _ms(np.percentile(overhead, 95)),
        "target_overhead_p50_ms": _ms(np.percentile(run.round_target_overhead_ns, 50)),
    }


def verify_step_ns(run: Run, num_draft_tokens: int) -> float:
    """Mean verify forward of `run`'s rounds with a block of `num_draft_tokens` (0: a target-only step), the first
    round of each request left out (its forward is timed apart from the prefill, but overlaps it). NaN where there
    is none (a run that fell back to target-only decoding throughout): the row shows it, the sweep goes on."""
    times = run.verify_ns_with_block(num_draft_tokens)
    return float(np.mean(times)) if times else float("nan")


def speculative_row(acceptance: float, pair_alpha: float, k: int, run: Run, baseline: Run, draft_step_ns: float,
                    hf_target: Run | None, hf_assisted: Run | None) -> dict:
    target_step_ns = verify_step_ns(baseline, 0)
    draft_step_cost = draft_step_ns / target_step_ns
    verify_cost = verify_step_ns(run, k) / target_step_ns
    alpha = run.alpha
    ideal = ideal_speedup(alpha, k, draft_step_cost, verify_cost)
    ideal_overlapped = ideal_speedup(alpha, k, 0.0, max(verify_cost, k * draft_step_cost))
    speedup = run.tokens_per_s / baseline.tokens_per_s
    row = {
        "acceptance_knob": acceptance,
        "alpha_at_build": round(pair_alpha, 4),
        "alpha": round(alpha, 4),
        "k": k,
        # vLLM's definitions: accepted / drafted, and 1 + accepted / drafts (the bonus or recovered token counts)
        "acceptance_rate": round(run.num_accepted_tokens / max(1, run.num_draft_tokens), 4),
        "mean_accepted_length": round(1 + run.num_accepted_tokens / max(1, run.num_drafts), 3),
        "expected_tokens_per_round": round(expected_tokens_per_round(alpha, k), 3),
        "draft_step_cost": round(draft_step_cost, 4),
        "verify_cost": round(verify_cost, 3),
        "tokens_per_s": round(run.tokens_per_s, 2),
        "baseline_tokens_per_s": round(baseline.tokens_per_s, 2),
        "speedup": round(speedup, 3),
        "ideal_speedup": round(ideal, 3),
        "ideal_speedup_overlapped": round(ideal_overlapped, 3),
        "measured_over_ideal": round(speedup / ideal, 3),
        "drafted_ahead": round(run.num_drafts_ahead / max(1, run.num_drafts), 3),  # share of blocks verified
        "same_tokens_as_baseline": run.token_ids == baseline.token_ids,
        "fallbacks": len(run.fallback_reasons),
        **round_breakdown(run),
    }
    if hf_target is not None and hf_assisted is not None:
        row["hf_assisted_tokens_per_s"] = round(hf_assisted.tokens_per_s, 2)
        row["hf_target_tokens_per_s"] = round(hf_target.tokens_per_s, 2)
        row["hf_assisted_speedup"] = round(hf_assisted.tokens_per_s / hf_target.tokens_per_s, 3)
    return row


def schedule_row(acceptance: float, max_k: int, goodput: Run, fixed: dict[int, Run], baseline: Run) -> dict:
    """The goodput schedule at k <= max_k against each constant k (`fixed`, k = 0 is target-only) on one pair."""
    best_k = max((k for k in fixed if k), key=lambda k: fixed[k].tokens_per_s)
    return {
        "acceptance_knob": acceptance,
        "alpha": round(goodput.alpha, 4),
        "max_k": max_k,
        "tokens_per_s": round(goodput.tokens_per_s, 2),
        "speedup": round(goodput.tokens_per_s / baseline.tokens_per_s, 3),
        "best_fixed_k": best_k,
        "best_fixed_speedup": round(fixed[best_k].tokens_per_s / baseline.tokens_per_s, 3),
        "over_best_fixed": round(goodput.tokens_per_s / fixed[best_k].tokens_per_s, 3),
        "max_k_speedup": round(fixed[max_k].tokens_per_s / baseline.tokens_per_s, 3),
        # draft tokens per block when there is one, and the share of rounds that had one (the rest: target-only)
        "mean_block": round(goodput.num_draft_tokens / max(1, goodput.num_drafts), 2),
        "rounds_with_block": round(goodput.num_drafts / max(1, goodput.rounds), 3),
        "same_tokens_as_baseline": goodput.token_ids == baseline.token_ids,
        "fallbacks": len(goodput.fallback_reasons),
    }


def schedule_table(results: dict) -> str:
    lines = ["| alpha knob | goodput schedule, k <= | tok/s | speedup | best constant k | its speedup | "
             "goodput / best constant | constant k at the bound | mean block | rounds with a block |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results.get("schedules", []):
        lines.append(f"| {row['acceptance_knob']:.2f} | {row['max_k']} | {row['tokens_per_s']:.1f} | "
                     f"{row['speedup']:.2f}x | {row['best_fixed_k']} | {row['best_fixed_speedup']:.2f}x | "
                     f"{row['over_best_fixed']:.2f}x | {row['max_k_speedup']:.2f}x | {row['mean_block']:.1f} | "
                     f"{row['rounds_with_block']:.0%} |")
    return "\n".join(lines)


def baseline_row(acceptance: float, baseline: Run, draft_step_ns: float) -> dict:
    return {
        "acceptance_knob": acceptance,
        "tokens_per_s": round(baseline.tokens_per_s, 2),
        "target_step_ms": _ms(verify_step_ns(baseline, 0)),
        "draft_step_ms": _ms(draft_step_ns),
        **round_breakdown(baseline),
    }


COLUMNS = [  # (header, key, format)
    ("alpha knob", "acceptance_knob", "{:.2f}"),
    ("alpha", "alpha", "{:.2f}"),
    ("k", "k", "{}"),
    ("acc. rate", "acceptance_rate", "{:.2f}"),
    ("mean acc. len", "mean_accepted_length", "{:.2f}"),
    ("tok/s", "tokens_per_s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("ideal", "ideal_speedup", "{:.2f}x"),
    ("meas/ideal", "measured_over_ideal", "{:.2f}"),
    ("ideal overlapped", "ideal_speedup_overlapped", "{:.2f}x"),
    ("drafted ahead", "drafted_ahead", "{:.0%}"),
    ("HF assisted", "hf_assisted_speedup", "{:.2f}x"),
    ("c", "draft_step_cost", "{:.3f}"),
    ("v(k)", "verify_cost", "{:.2f}"),
    ("overhead p50/p95 ms", None, None),
]


def table(results: dict) -> str:
    """The rows as a Markdown table (it reads in a terminal and pastes into the README)."""
    headers = [header for header, _, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in results["runs"]:
        cells = []
        for _, key, fmt in COLUMNS:
            if key is None:
                cells.append(f"{row['overhead_p50_ms']:.2f} / {row['overhead_p95_ms']:.2f}")
            else:
                cells.append(fmt.format(row[key]) if key in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if "grpc_rtt" in results:
        rtt = results["grpc_rtt"]
        lines.append(f"\nthe floor: a bare gRPC bidi round trip between the halves' CPUs, p50/p95 {rtt['p50_ms']:.2f} / "
                     f"{rtt['p95_ms']:.2f} ms back to back, p50 {rtt['idle_p50_ms']:.2f} ms after "
                     f"{rtt['idle_ms']:g} ms idle (as in a round)")
    for base in results["baselines"]:
        lines.append(f"\ntarget-only baseline at alpha knob {base['acceptance_knob']:.2f}: "
                     f"{base['tokens_per_s']:.1f} tok/s, target step {base['target_step_ms']:.1f} ms, "
                     f"draft step {base['draft_step_ms']:.2f} ms, overhead per token p50/p95 "
                     f"{base['overhead_p50_ms']:.2f} / {base['overhead_p95_ms']:.2f} ms")
    return "\n".join(lines)


def output_problems(results: dict) -> list[str]:
    """Every compared system whose greedy output was not target-only's token for token, or that fell back to
    target-only decoding: its speed is not speculative decoding's (or not exact decoding's), whatever the table says.
    Empty when all is well."""
    modes = results.get("modes", {})
    sections = [("sweep", results.get("runs", [])), ("goodput schedule", results.get("schedules", [])),
                ("modes pipelining", modes.get("pipelining", [])),
                ("modes heuristic schedule", [modes["adaptive"]] if "adaptive" in modes else []),
                ("modes goodput schedule", [modes["goodput"]] if "goodput" in modes else []),
                ("modes concurrency", modes.get("concurrency", [])),
                ("deep-draft pipelining", modes.get("deep_draft", {}).get("rows", []))]
    problems = []
    for section, rows in sections:
        for row in rows:
            where = ", ".join(f"{key} {row[key]}" for key in ("acceptance_knob", "k", "max_k", "streams") if key in row)
            if not row["same_tokens_as_baseline"]:
                problems.append(f"{section} ({where}): output differs from target-only")
            if row["fallbacks"]:
                problems.append(f"{section} ({where}): {row['fallbacks']} fallback(s) to target-only decoding")
    return problems


def write_json(results: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def plot(results: dict, path: pathlib.Path) -> str | None:
    """Speedup vs alpha per k (measured, ideal, HF assisted) and where a round's time goes; None when matplotlib
    is missing (it is the `bench` extra), else the path written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = results["runs"]
    ks = sorted({row["k"] for row in runs})
    figure, (speedups, breakdown) = plt.subplots(1, 2, figsize=(13, 5))
    for index, k in enumerate(ks):
        rows = sorted((row for row in runs if row["k"] == k), key=lambda row: row["alpha"])
        alphas = [row["alpha"] for row in rows]
        color = f"C{index}"
        speedups.plot(alphas, [row["speedup"] for row in rows], "o-", color=color, label=f"splitspec k={k}")
        speedups.plot(alphas, [row["ideal_speedup"] for row in rows], "--", color=color, alpha=0.6,
                      label=f"ideal k={k}")
        speedups.plot(alphas, [row["ideal_speedup_overlapped"] for row in rows], ":", color=color, alpha=0.4,
                      label=f"ideal overlapped k={k}")
        if all("hf_assisted_speedup" in row for row in rows):
            speedups.plot(alphas, [row["hf_assisted_speedup"] for row in rows], "x-.", color=color,
                          label=f"HF assisted k={k}")
    speedups.axhline(1.0, color="grey", linewidth=0.8)
    speedups.set(xlabel="measured alpha (per-token greedy acceptance)", ylabel="speedup over target-only",
                 title="Speedup vs acceptance")
    speedups.legend(fontsize=7, ncol=2)

    main = results["config"]["main_acceptance"]
    rows = [row for row in runs if row["acceptance_knob"] == main]
    labels = [f"k={row['k']}" for row in rows]
    bottom = np.zeros(len(rows))
    for key, label in (("draft_compute_ms", "draft compute waited for"), ("verify_compute_ms", "verify compute"),
                       ("overhead_ms", "orchestration overhead")):
        values = np.array([row[key] for row in rows])
        breakdown.bar(labels, values, bottom=bottom, label=label)
        bottom += values
    breakdown.set(ylabel="ms per round (mean)", title=f"Where a round's time goes (alpha knob {main:.2f})")
    breakdown.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)
