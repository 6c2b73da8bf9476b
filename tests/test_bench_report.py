"""`make bench`'s arithmetic (splitspec/bench/runs.py, report.py, modes.py) on scripted streams: what it derives
from the target's stream chunks and stats, without servers."""

import json
import math
import pathlib

import pytest
from splitspec_client import GenerationStats, RoundTiming, StreamChunk

from splitspec.bench import modes, report, runs

PREFILL_NS = 200_000_000  # a long prompt's prefill: the stats count it in verify_ns, no round does


class ScriptedClient:
    """Client.stream's chunks for scripted rounds: (block size, accepted draft tokens, verify forward ns) each."""

    def __init__(self, rounds: list[tuple[int, int, int]]):
        self.rounds = rounds

    def stream(self, prompt, max_new_tokens, num_speculative_tokens, ignore_eos):
        per_position, generated = [], 0
        blocks = [(size, accepted) for size, accepted, _ in self.rounds if size]
        for size, accepted in blocks:
            per_position += [0] * (size - len(per_position))
            for position in range(accepted):
                per_position[position] += 1
        for index, (size, accepted, verify_ns) in enumerate(self.rounds):
            token_ids = tuple(range(generated, generated + accepted + 1))
            generated += len(token_ids)
            timing = RoundTiming(round_ns=verify_ns + 3_000_000, draft_wait_ns=2_000_000 if size else 0,
                                 block_draft_ns=1_500_000 if size else 0, verify_ns=verify_ns, drafted_ahead=False,
                                 batch_size=1, num_draft_tokens=size)
            stats = None
            if index == len(self.rounds) - 1:
                stats = GenerationStats(
                    prompt_tokens=len(prompt), generated_tokens=generated, rounds=len(self.rounds),
                    num_drafts=len(blocks), num_draft_tokens=sum(size for size, _ in blocks),
                    num_accepted_tokens=sum(accepted for _, accepted in blocks),
                    num_accepted_tokens_per_pos=tuple(per_position), acceptance_rate=0.0, mean_accepted_length=0.0,
                    time_to_first_token_ns=1, total_time_ns=1,
                    draft_wait_ns=sum(2_000_000 for size, _, _ in self.rounds if size),
                    verify_ns=PREFILL_NS + sum(verify_ns for _, _, verify_ns in self.rounds), draft_server="d",
                    fallback_reason="", num_drafts_ahead=0, num_stale_drafts=0)
            yield StreamChunk(text="", token_ids=token_ids, finish_reason="length" if stats else None, stats=stats,
                              round_timing=timing)


def _run(rounds: list[tuple[int, int, int]], k: int) -> runs.Run:
    return runs.run_splitspec(ScriptedClient(rounds), [[5, 6, 7]], sum(a + 1 for _, a, _ in rounds), k)


def test_alpha_counts_every_block_accepted_whole_whatever_its_size():
    # A goodput-like schedule asked for k <= 8: blocks of 3 and 2 accepted whole, one of 8 accepted whole, one of 8
    # rejected at its 6th token, a short last block of 1 accepted whole. One rejection in 3+2+8+5+1 = 19 accepted.
    rounds = [(3, 3, 30), (2, 2, 30), (8, 8, 40), (8, 5, 40), (0, 0, 25), (1, 1, 28)]
    run = _run(rounds, 8)
    assert run.full_blocks == 4  # before: only blocks of 8 accepted whole counted (1), alpha 19 / 23
    assert run.alpha == pytest.approx(19 / 20)


def test_alpha_of_a_constant_k_counts_the_short_last_block():
    run = _run([(4, 4, 30), (4, 1, 30), (4, 4, 30), (2, 2, 30)], 4)
    assert run.alpha == pytest.approx(11 / 12)  # before: 11 / 13, the last block of 2 taken for rejected


def test_verify_cost_and_target_step_leave_each_prompts_prefill_out():
    step, verify_4 = 25_000_000, 40_000_000
    baseline = _run([(0, 0, step)] * 10, 0)
    # The first round of each request is left out of the per-round figures; the short last block (2) is no v(4).
    run = _run([(4, 4, 99_000_000), (4, 2, verify_4), (4, 4, verify_4), (4, 1, verify_4), (2, 0, 33_000_000)], 4)
    row = report.speculative_row(0.9, 0.9, 4, run, baseline, draft_step_ns=2_500_000, hf_target=None,
                                 hf_assisted=None)
    # Before: the stats' verify_ns over rounds, the prefill spread over 10 and 5 rounds: 90.4 ms / 45 ms, v 2.0.
    assert row["verify_cost"] == pytest.approx(verify_4 / step, abs=1e-3)
    assert row["draft_step_cost"] == pytest.approx(0.1, abs=1e-4)
    assert report.baseline_row(0.9, baseline, 2_500_000)["target_step_ms"] == pytest.approx(25.0)


def test_verify_cost_without_a_round_of_k_is_nan_not_a_crash():
    baseline = _run([(0, 0, 25_000_000)] * 4, 0)
    fell_back = _run([(2, 1, 30_000_000)] + [(0, 0, 25_000_000)] * 4, 2)  # only the first round had a block
    row = report.speculative_row(0.9, 0.9, 2, fell_back, baseline, 2_500_000, None, None)
    assert math.isnan(row["verify_cost"]) and math.isnan(row["ideal_speedup"])


def test_deep_draft_ratio_compares_whole_blocks_of_k():
    baseline = _run([(0, 0, 25_000_000)] * 6, 0)
    # A short last block (1) drafts and verifies faster: it is not "k x draft step ~ verify".
    sequential = _run([(3, 3, 33_000_000), (3, 1, 33_000_000), (3, 3, 34_000_000), (1, 1, 27_000_000),
                       (1, 0, 27_000_000), (1, 1, 27_000_000)], 3)
    row = modes.deep_draft_row(0.9, type("Pair", (), {"measured_acceptance": 0.9}), 3, sequential, sequential,
                               baseline)
    assert row["verify_p50_ms"] == pytest.approx(33.5)  # the rounds after the first with a block of 3


RESULTS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results" / "cpu-2core.json"  # a real run


def _bench_main_on(results: dict, tmp_path, monkeypatch) -> int:
    """`python -m splitspec.bench` printing and judging `results` instead of measuring them."""
    from splitspec.bench import __main__ as bench

    monkeypatch.setattr(bench, "sweep", lambda config, args, progress: results)
    monkeypatch.setattr(report, "plot", lambda results, path: None)
    return bench.main(["--output", str(tmp_path)])


def test_bench_passes_when_every_output_is_target_onlys(tmp_path, monkeypatch, capsys):
    results = json.loads(RESULTS.read_text())
    assert report.output_problems(results) == []
    assert _bench_main_on(results, tmp_path, monkeypatch) == 0
    assert "FAILED" not in capsys.readouterr().err


def test_bench_fails_loudly_when_an_output_differs_or_a_run_fell_back(tmp_path, monkeypatch, capsys):
    results = json.loads(RESULTS.read_text())
    results["runs"][14]["same_tokens_as_baseline"] = False  # alpha knob 0.9, k 4
    results["modes"]["concurrency"][3]["fallbacks"] = 2
    results["modes"]["deep_draft"]["rows"][0]["same_tokens_as_baseline"] = False
    assert _bench_main_on(results, tmp_path, monkeypatch) == 1  # before: 0, the flags only in bench.json
    err = capsys.readouterr().err
    assert "FAILED: sweep (acceptance_knob 0.9, k 4): output differs from target-only" in err
    assert "FAILED: modes concurrency (streams 8): 2 fallback(s) to target-only decoding" in err
    assert "FAILED: deep-draft pipelining (acceptance_knob 0.9, k 3): output differs from target-only" in err
    assert err.count("FAILED") == 3


def test_bench_json_names_the_commit_measured():
    import subprocess

    from splitspec.bench.__main__ import machine

    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parent, check=True).stdout.strip()
    commit = machine([0, 1], [0], [1], [0, 1])["commit"]
    assert commit.removesuffix("-dirty") == head  # before: no commit in bench.json, the README's named by hand
