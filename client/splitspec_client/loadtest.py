"""Load test of a target server over the SDK (`splitspec loadtest`): concurrent requests, then latency percentiles.

It measures what ghz measures for unary calls (count, requests/s, latency, status codes) and, with `stream=True`,
what ghz cannot measure for a stream: time to first token and inter-token latency.

Definitions (seconds):
- latency: from sending a request to its last response, i.e. the whole call.
- TTFT (streams): from sending a request to the first message that carries tokens.
- inter-token latency (streams): the gap between a message that carries tokens and the previous one, shared evenly
  among its tokens, one sample per token. Accepted tokens arrive in blocks; sharing the gap keeps a block of 4
  tokens in 40 ms at 10 ms per token rather than one 40 ms sample and three missing ones.
- tokens/s: tokens of successful requests / wall time of the run.
Latency, TTFT and inter-token latency summarise successful requests; failed ones are counted by status code.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ._request import build_generate_request
from .client import Client
from .errors import SplitspecError


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """What to send. The run ends after `total` requests, or once `duration_s` has passed (requests in flight then
    finish, each within the client's deadline)."""

    prompts: tuple[str, ...]  # sent in turn
    params: dict[str, Any]  # generation parameters: the keywords of Client.generate
    concurrency: int = 4  # requests in flight at most
    total: int | None = None
    duration_s: float | None = None
    # Requests per second on a fixed schedule (request i starts at i / rate, or as soon as a worker is free after
    # that); None: as fast as `concurrency` allows.
    rate: float | None = None
    stream: bool = False  # GenerateStream instead of Generate

    def __post_init__(self):
        if (self.total is None) == (self.duration_s is None):
            raise ValueError("give exactly one of total and duration_s: the run must end by itself")
        if not self.prompts:
            raise ValueError("prompts: give at least one prompt")
        # Wrong parameters, or a prompt that is not valid text, fail here, once, rather than in the workers.
        for prompt in self.prompts:
            build_generate_request(prompt, **self.params)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One request's result."""

    status: str  # "OK" or the gRPC status name
    latency_s: float
    generated_tokens: int = 0
    ttft_s: float | None = None
    inter_token_s: tuple[float, ...] = ()
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    fallback: bool = False  # the target decoded (partly) without a draft server


@dataclasses.dataclass(frozen=True)
class Progress:
    elapsed_s: float
    done: int
    in_flight: int
    failed: int


class LoadRun:
    """Runs a LoadPlan on `concurrency` threads that share one client (one channel, as ghz does by default)."""

    def __init__(self, client: Client, plan: LoadPlan):
        self._client = client
        self._plan = plan
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Set by the last worker to end. The main thread waits on it, not on Thread.join: a Ctrl-C that interrupts
        # join() on Python 3.11 marks the thread stopped while it still runs (bpo-45274), and the report would then
        # leave out the requests in flight.
        self._workers_done = threading.Event()
        self._workers_left = 0
        self._scheduled = 0
        self._in_flight = 0
        self._outcomes: list[Outcome] = []
        self._start = 0.0

    def run(self, on_progress: Callable[[Progress], None] | None = None, interval_s: float = 0.25) -> dict:
        """Send the plan's requests and return the report (see `summarize`). Ctrl-C stops sending; the requests in
        flight finish and the report covers what was done."""
        self._start = time.monotonic()
        self._workers_left = self._plan.concurrency
        for _ in range(self._plan.concurrency):
            threading.Thread(target=self._work, daemon=True).start()
        try:
            self._wait_for_workers(on_progress, interval_s)
        except KeyboardInterrupt:
            self._stop.set()
            self._wait_for_workers(on_progress, interval_s)
        wall_time_s = time.monotonic() - self._start
        if on_progress is not None:
            on_progress(self.progress())
        return summarize(self._outcomes, wall_time_s)

    def _wait_for_workers(self, on_progress: Callable[[Progress], None] | None, interval_s: float) -> None:
        while not self._workers_done.wait(interval_s):
            if on_progress is not None:
                on_progress(self.progress())

    def progress(self) -> Progress:
        with self._lock:
            failed = sum(outcome.status != "OK" for outcome in self._outcomes)
            return Progress(time.monotonic() - self._start, len(self._outcomes), self._in_flight, failed)

    def _next(self) -> tuple[int, float] | None:
        """The index and start time of the next request, or None once the plan is done."""
        plan = self._plan
        with self._lock:
            index, now = self._scheduled, time.monotonic()
            due = self._start + index / plan.rate if plan.rate else now
            over = (plan.total is not None and index >= plan.total) or (
                plan.duration_s is not None and max(due, now) >= self._start + plan.duration_s
            )
            if over or self._stop.is_set():
                return None
            self._scheduled += 1
            return index, due

    def _work(self) -> None:
        try:
            while (slot := self._next()) is not None:
                index, due = slot
                # A stop during the wait leaves this slot unsent: only requests that were sent are counted.
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return
                with self._lock:
                    self._in_flight += 1
                outcome = self._send(self._plan.prompts[index % len(self._plan.prompts)])
                with self._lock:
                    self._in_flight -= 1
                    self._outcomes.append(outcome)
        finally:
            with self._lock:
                self._workers_left -= 1
                if self._workers_left == 0:
                    self._workers_done.set()

    def _send(self, prompt: str) -> Outcome:
        started = time.perf_counter()
        try:
            if self._plan.stream:
                return self._send_stream(prompt, started)
            result = self._client.generate(prompt, **self._plan.params)
        except SplitspecError as err:
            return Outcome(err.code.name, time.perf_counter() - started)
        stats = result.stats
        return Outcome("OK", time.perf_counter() - started, len(result.token_ids),
                       num_draft_tokens=stats.num_draft_tokens, num_accepted_tokens=stats.num_accepted_tokens,
                       fallback=bool(stats.fallback_reason))

    def _send_stream(self, prompt: str, started: float) -> Outcome:
        ttft_s, last, tokens, inter_token_s, stats = None, started, 0, [], None
        for chunk in self._client.stream(prompt, **self._plan.params):
            now = time.perf_counter()
            count = len(chunk.token_ids)
            if count:
                if ttft_s is None:
                    ttft_s = now - started
                else:
                    inter_token_s.extend([(now - last) / count] * count)
                last, tokens = now, tokens + count
            stats = chunk.stats or stats
        latency_s = time.perf_counter() - started
        if stats is None:
            return Outcome("OK", latency_s, tokens, ttft_s, tuple(inter_token_s))
        return Outcome("OK", latency_s, tokens, ttft_s, tuple(inter_token_s), stats.num_draft_tokens,
                       stats.num_accepted_tokens, bool(stats.fallback_reason))


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted samples, interpolating linearly between ranks (numpy's default)."""
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(samples: Sequence[float]) -> dict[str, float] | None:
    """count, mean, min, p50, p90, p99, max of `samples`; None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    summary = {"count": len(ordered), "mean": sum(ordered) / len(ordered), "min": ordered[0]}
    summary.update({f"p{q}": percentile(ordered, q) for q in (50, 90, 99)})
    summary["max"] = ordered[-1]
    return summary


def summarize(outcomes: Sequence[Outcome], wall_time_s: float) -> dict:
    """The report: counts, status codes, rates and distributions (seconds) over the given outcomes."""
    ok = [outcome for outcome in outcomes if outcome.status == "OK"]
    drafted = sum(outcome.num_draft_tokens for outcome in ok)
    generated = sum(outcome.generated_tokens for outcome in ok)
    status_codes = Counter(outcome.status for outcome in outcomes)
    return {
        "count": len(outcomes),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "status_codes": dict(status_codes.most_common()),
        "wall_time_s": wall_time_s,
        "rps": len(outcomes) / wall_time_s if wall_time_s > 0 else 0.0,
        "latency_s": distribution([outcome.latency_s for outcome in ok]),
        "ttft_s": distribution([outcome.ttft_s for outcome in ok if outcome.ttft_s is not None]),
        "inter_token_latency_s": distribution([gap for outcome in ok for gap in outcome.inter_token_s]),
        "generated_tokens": generated,
        "tokens_per_s": generated / wall_time_s if wall_time_s > 0 else 0.0,
        # vLLM's definition: accepted / drafted, over all requests together.
        "acceptance_rate": sum(outcome.num_accepted_tokens for outcome in ok) / drafted if drafted else None,
        "fallbacks": sum(outcome.fallback for outcome in ok),
    }


def format_report(report: dict) -> str:
    """The report as text, times in milliseconds."""
    status = ", ".join(f"{code} {count}" for code, count in report["status_codes"].items()) or "none"
    lines = [
        f"requests: {report['count']} in {report['wall_time_s']:.2f} s ({report['rps']:.2f} req/s), "
        f"{report['errors']} failed",
        f"status codes: {status}",
    ]
    for label, key in (("latency", "latency_s"), ("TTFT", "ttft_s"), ("inter-token", "inter_token_latency_s")):
        summary = report[key]
        if summary is not None:
            lines.append(
                f"{label}: p50 {summary['p50'] * 1e3:.1f} ms, p90 {summary['p90'] * 1e3:.1f} ms, "
                f"p99 {summary['p99'] * 1e3:.1f} ms (mean {summary['mean'] * 1e3:.1f}, max {summary['max'] * 1e3:.1f})"
            )
    tokens = f"tokens: {report['generated_tokens']} ({report['tokens_per_s']:.1f} tokens/s)"
    if report["acceptance_rate"] is not None:
        tokens += f", acceptance rate {report['acceptance_rate']:.2f}"
    if report["fallbacks"]:
        tokens += f", {report['fallbacks']} requests without speculation (fallback)"
    lines.append(tokens)
    return "\n".join(lines)
