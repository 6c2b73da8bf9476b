"""`splitspec loadtest`: its statistics on known samples, then runs against a real target server (tiny models,
loopback) checking that the report's counts agree with what was asked and with each other."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from splitspec_client.cli import main
from splitspec_client.loadtest import LoadPlan, LoadRun, Outcome, percentile, summarize

MAX_NEW_TOKENS = 8


def test_percentile_interpolates_between_ranks_like_numpy():
    ordered = [1.0, 2.0, 3.0, 4.0]
    assert percentile(ordered, 0) == 1.0
    assert percentile(ordered, 50) == 2.5
    assert percentile(ordered, 90) == pytest.approx(3.7)
    assert percentile(ordered, 100) == 4.0
    assert percentile([5.0], 99) == 5.0


def test_summary_counts_every_request_and_times_only_the_successful_ones():
    outcomes = [
        Outcome("OK", 0.1, 4, ttft_s=0.02, inter_token_s=(0.01,) * 3, num_draft_tokens=3, num_accepted_tokens=2),
        Outcome("OK", 0.3, 4, ttft_s=0.04, inter_token_s=(0.02,) * 3, num_draft_tokens=3, num_accepted_tokens=3,
                fallback=True),
        Outcome("INVALID_ARGUMENT", 0.001),
    ]
    report = summarize(outcomes, wall_time_s=2.0)
    assert (report["count"], report["ok"], report["errors"]) == (3, 2, 1)
    assert report["status_codes"] == {"OK": 2, "INVALID_ARGUMENT": 1}
    assert report["rps"] == 1.5
    assert report["latency_s"]["count"] == 2 and report["latency_s"]["mean"] == pytest.approx(0.2)
    assert report["ttft_s"]["p50"] == pytest.approx(0.03)
    assert report["inter_token_latency_s"]["count"] == 6
    assert (report["generated_tokens"], report["tokens_per_s"]) == (8, 4.0)
    assert report["acceptance_rate"] == pytest.approx(5 / 6)
    assert report["fallbacks"] == 1


def test_a_plan_must_end_by_itself():
    with pytest.raises(ValueError, match="exactly one of total and duration_s"):
        LoadPlan(prompts=("x",), params={})
    with pytest.raises(TypeError, match="stop"):
        LoadPlan(prompts=("x",), params={"stop": 3}, total=1)
    # Every prompt is checked, not only the first: a worker would otherwise die on it.
    with pytest.raises(ValueError, match="^prompt: "):
        LoadPlan(prompts=("x", "\udcff"), params={}, total=2)


class _SlowClient:
    """Answers each Generate after `seconds`, as a server would (LoadRun needs only `generate`)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def generate(self, prompt, **params):
        time.sleep(self.seconds)
        stats = types.SimpleNamespace(num_draft_tokens=0, num_accepted_tokens=0, fallback_reason="")
        return types.SimpleNamespace(token_ids=(1, 2), stats=stats)


def test_ctrl_c_stops_sending_and_the_requests_in_flight_finish_into_the_report():
    """Ctrl-C lands in the main thread while it waits for the workers; on Python 3.11 an interrupted
    Thread.join marks a live thread as stopped (bpo-45274), so the run must not rely on joins."""
    plan = LoadPlan(prompts=("x",), params={}, concurrency=1, total=100)
    progress = []
    # A real SIGINT to the main thread, as Ctrl-C sends: it interrupts the wait the main thread is blocked in.
    threading.Timer(0.4, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    report = LoadRun(_SlowClient(1.0), plan).run(on_progress=progress.append, interval_s=0.05)
    # The request in flight at the interrupt finished and is counted; none was sent after it.
    assert (report["count"], report["ok"], report["generated_tokens"]) == (1, 1, 2)
    assert (progress[-1].done, progress[-1].in_flight) == (1, 0)
    assert report["wall_time_s"] >= 1.0


def _loadtest(address: str, tmp_path, *args: str) -> tuple[int, dict]:
    report_path = tmp_path / "report.json"
    code = main(["loadtest", "--target", address, "--json", str(report_path), *args])
    return code, json.loads(report_path.read_text())


def _assert_ordered(summary: dict) -> None:
    assert summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]


def test_unary_run_counts_requests_and_tokens(target_related, tmp_path, capsys):
    code, report = _loadtest(target_related.address, tmp_path, "--total", "20", "--concurrency", "4",
                             "--max-new-tokens", str(MAX_NEW_TOKENS), "--ignore-eos")
    assert code == 0
    assert (report["call"], report["target"], report["concurrency"]) == ("Generate", target_related.address, 4)
    assert (report["count"], report["ok"], report["errors"]) == (20, 20, 0)
    assert report["status_codes"] == {"OK": 20}
    # ignore_eos: every request generates exactly max_new_tokens.
    assert report["generated_tokens"] == 20 * MAX_NEW_TOKENS
    assert report["tokens_per_s"] == pytest.approx(report["generated_tokens"] / report["wall_time_s"])
    assert report["rps"] == pytest.approx(20 / report["wall_time_s"])
    assert report["latency_s"]["count"] == 20
    _assert_ordered(report["latency_s"])
    assert report["latency_s"]["max"] <= report["wall_time_s"]
    # Unary calls carry no per-token timing.
    assert report["ttft_s"] is None and report["inter_token_latency_s"] is None
    assert 0.0 <= report["acceptance_rate"] <= 1.0
    out, err = capsys.readouterr()
    assert "20/20 done, 0 in flight, 0 failed" in err.splitlines()[-1]
    assert "status codes: OK 20" in out and "latency: p50" in out


def test_streaming_run_measures_first_token_and_inter_token_latency(target_related, tmp_path):
    """Through the console entry point, as a user runs it."""
    report_path = tmp_path / "stream.json"
    finished = subprocess.run(
        [sys.executable, "-m", "splitspec_client", "loadtest", "--target", target_related.address, "--stream",
         "--total", "20", "--concurrency", "4", "--max-new-tokens", str(MAX_NEW_TOKENS), "--ignore-eos",
         "--prompt", "Once upon a time", "--prompt", "The quick brown fox", "--json", str(report_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    report = json.loads(report_path.read_text())
    assert report["call"] == "GenerateStream"
    assert (report["count"], report["ok"], report["status_codes"]) == (20, 20, {"OK": 20})
    assert report["generated_tokens"] == 20 * MAX_NEW_TOKENS
    latency, ttft, inter_token = report["latency_s"], report["ttft_s"], report["inter_token_latency_s"]
    assert ttft["count"] == 20
    # One inter-token sample per token after each request's first message, which carries at least one.
    assert 0 < inter_token["count"] <= 20 * (MAX_NEW_TOKENS - 1)
    for summary in (latency, ttft, inter_token):
        _assert_ordered(summary)
    # Per request, the first token plus the gaps after it end at the last token, before the call ends.
    assert ttft["mean"] * 20 + inter_token["mean"] * inter_token["count"] <= latency["mean"] * 20 + 1e-6
    assert "TTFT: p50" in finished.stdout and "inter-token: p50" in finished.stdout


def test_invalid_parameters_are_counted_as_invalid_argument(target_related, tmp_path, capsys):
    code, report = _loadtest(target_related.address, tmp_path, "--total", "20", "--concurrency", "4",
                             "--top-p", "2")
    assert code == 1
    assert (report["count"], report["ok"], report["errors"]) == (20, 0, 20)
    assert report["status_codes"] == {"INVALID_ARGUMENT": 20}
    assert report["latency_s"] is None and report["generated_tokens"] == 0
    assert "status codes: INVALID_ARGUMENT 20" in capsys.readouterr().out


def test_duration_and_rate_bound_the_run(target_related, tmp_path):
    code, report = _loadtest(target_related.address, tmp_path, "--duration", "1", "--rate", "10",
                             "--concurrency", "2", "--max-new-tokens", "2")
    assert code == 0
    # Ten start slots fit in one second at 10 requests/s; a slow server may use fewer of them, never more.
    assert 3 <= report["count"] <= 10
    assert report["ok"] == report["count"]
    assert report["wall_time_s"] >= 0.9
