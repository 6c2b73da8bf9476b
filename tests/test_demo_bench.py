"""The demo pair builder, `make demo`'s driver and `make bench`, on tiny models. No speed is asserted: the
machine is shared and noisy; outputs, fields and exactness are."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from splitspec import demo_models
from splitspec.bench import cuda
from splitspec.kv_cache import CausalLMRunner

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_module(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-models")


def test_demo_pair_is_loadable_and_its_acceptance_follows_the_knob(models_dir):
    low = demo_models.ensure_pair(0.5, "tiny", models_dir / "low")
    high = demo_models.ensure_pair(0.9, "tiny", models_dir / "high")
    shape = demo_models.SHAPES["tiny"]
    prompts = demo_models.text_prompts(demo_models.build_tokenizer(shape.vocab_size, shape.text_modules),
                                       shape.text_modules, 12, 10)  # not the prompts the build measured on
    measured = {}
    for pair in (low, high):
        target = AutoModelForCausalLM.from_pretrained(pair.target_dir).eval()
        draft = AutoModelForCausalLM.from_pretrained(pair.draft_dir).eval()
        assert (target.config.num_hidden_layers, draft.config.num_hidden_layers) == (shape.num_layers, 1)
        assert AutoTokenizer.from_pretrained(pair.target_dir).get_vocab() == \
            AutoTokenizer.from_pretrained(pair.draft_dir).get_vocab()
        assert abs(pair.measured_acceptance - pair.acceptance) < 0.1, pair
        measured[pair.acceptance] = demo_models.measure_acceptance(target, draft, prompts, 48)
    assert measured[0.9] > measured[0.5] + 0.2, measured


def test_demo_pair_is_deterministic_and_reused(models_dir):
    first = demo_models.ensure_pair(0.7, "tiny", models_dir / "a")
    second = demo_models.build_pair(models_dir / "b", "tiny", 0.7, log=lambda message: None)

    def digest(directory: str) -> str:
        return hashlib.sha256((pathlib.Path(directory) / "model.safetensors").read_bytes()).hexdigest()

    assert digest(first.target_dir) == digest(second.target_dir)
    assert digest(first.draft_dir) == digest(second.draft_dir)
    built = []
    assert demo_models.ensure_pair(0.7, "tiny", models_dir / "a", log=built.append) == first
    assert built == []  # found in the cache, not rebuilt


def _draft_work_over_target_work(shape: demo_models.PairShape) -> float:
    """Per-token work is the weights a token passes through (the embedding is a lookup): count them."""
    with torch.device("meta"):
        target = LlamaForCausalLM(LlamaConfig(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
            num_key_value_heads=shape.num_key_value_heads, tie_word_embeddings=False))
    per_layer = sum(p.numel() for p in target.model.layers[0].parameters())
    head = target.lm_head.weight.numel()
    return (shape.draft_layers * per_layer + head) / (shape.num_layers * per_layer + head)


def test_demo_shape_draft_step_is_at_most_an_eighth_of_a_target_step():
    assert _draft_work_over_target_work(demo_models.SHAPES["demo"]) <= 1 / 8


def test_deep_draft_shape_drafts_a_block_of_three_or_four_in_about_one_verify():
    # Verifying 4-5 tokens on a CPU costs about 1.4-1.6 target steps (make bench's v(k)): a draft step of 0.3-0.5
    # of a target step makes k x draft step ~ verify at k = 3-4.
    assert 0.3 <= _draft_work_over_target_work(demo_models.SHAPES["demo-deep-draft"]) <= 0.5


def test_deep_draft_pair_is_the_targets_first_layers_and_follows_the_knob(models_dir):
    pair = demo_models.ensure_pair(0.9, "tiny-deep-draft", models_dir / "deep")
    shape = demo_models.SHAPES["tiny-deep-draft"]
    target = AutoModelForCausalLM.from_pretrained(pair.target_dir).eval()
    draft = AutoModelForCausalLM.from_pretrained(pair.draft_dir).eval()
    assert (target.config.num_hidden_layers, draft.config.num_hidden_layers) == (shape.num_layers, 2)
    target_weights = target.state_dict()
    for name, weight in draft.state_dict().items():  # the draft's layers are the target's, unscaled
        assert torch.equal(weight, target_weights[name]), name
    assert abs(pair.measured_acceptance - pair.acceptance) < 0.1, pair


def test_demo_driver_streams_and_prints_its_stats(models_dir):
    result = _run_module("splitspec.demo", "--tiny", "--models-dir", str(models_dir), "--max-new-tokens", "24")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in ("acceptance rate", "mean accepted length", "tokens/s", "speedup", "over target-only decoding"):
        assert line in out, out
    assert "same tokens: yes" in out, out
    assert out.rstrip().endswith("Servers stopped."), out


@pytest.mark.parametrize("acceptance", ["0.3", "0.99"])
def test_demo_driver_refuses_an_acceptance_no_pair_is_built_for(acceptance, capsys):
    from splitspec import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--acceptance", acceptance])
    assert exit_info.value.code == 2
    low, high = demo_models.acceptance_range(demo_models.SHAPES["demo"])
    assert f"--acceptance must be in [{low}, {high}] for the demo pair" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def test_demo_driver_stops_both_servers_on_ctrl_c(models_dir):
    demo_models.ensure_pair(0.8, "tiny", models_dir / demo_models.pair_name("tiny", 0.8))
    # A shell starts a background job with SIGINT ignored, and children inherit that: give the demo a terminal's.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([sys.executable, "-m", "splitspec.demo", "--tiny", "--models-dir", str(models_dir),
                                    "--max-new-tokens", "1000"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        for line in process.stdout:
            if line.startswith("--- splitspec"):
                break
        servers = _children(process.pid)
        assert len(servers) == 2, servers
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process
        output = process.communicate(timeout=60)[0]
    finally:
        process.kill()
    assert process.returncode == 130, output
    assert "Servers stopped." in output
    for pid in servers:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in pathlib.Path(f"/proc/{pid}/status").read_text()


RUN_FIELDS = {
    "acceptance_knob", "alpha_at_build", "alpha", "k", "acceptance_rate", "mean_accepted_length",
    "expected_tokens_per_round", "draft_step_cost", "verify_cost", "tokens_per_s", "baseline_tokens_per_s",
    "speedup", "ideal_speedup", "ideal_speedup_overlapped", "measured_over_ideal", "drafted_ahead",
    "same_tokens_as_baseline", "fallbacks", "round_wall_ms", "draft_compute_ms", "verify_compute_ms",
    "draft_wait_ms", "overhead_ms", "overhead_p50_ms", "overhead_p95_ms", "target_overhead_p50_ms",
}
HF_FIELDS = {"hf_assisted_tokens_per_s", "hf_target_tokens_per_s", "hf_assisted_speedup"}


def test_bench_quick_runs_end_to_end_and_writes_its_fields(models_dir, tmp_path):
    result = _run_module("splitspec.bench", "--quick", "--models-dir", str(models_dir), "--output", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {"config", "machine", "baselines", "runs"} <= results.keys()
    assert any((tmp_path / "logs").glob("target*")), "the servers' logs are kept with the results"
    config = results["config"]
    assert len(results["runs"]) == len(config["acceptances"]) * len(config["ks"])
    assert len(results["baselines"]) == len(config["acceptances"])
    for row in results["runs"]:
        expected = RUN_FIELDS | HF_FIELDS if row["k"] == config["hf_k"] else RUN_FIELDS
        assert expected <= row.keys(), expected - row.keys()
        assert row["same_tokens_as_baseline"] and row["fallbacks"] == 0, row  # greedy output is the target's
        assert 0 <= row["alpha"] <= 1 and row["ideal_speedup"] > 0 and row["speedup"] > 0
    for base in results["baselines"]:
        assert {"tokens_per_s", "target_step_ms", "draft_step_ms", "overhead_p50_ms", "overhead_p95_ms"} <= base.keys()
    assert "| alpha knob |" in result.stdout  # the table
    assert [row["acceptance_knob"] for row in results["schedules"]] == config["acceptances"]
    for row in results["schedules"]:  # the goodput schedule on each pair
        assert row["same_tokens_as_baseline"] and row["fallbacks"] == 0, row
        assert row["max_k"] == max(config["ks"]) and row["best_fixed_k"] in config["ks"], row
        assert 0 <= row["rounds_with_block"] <= 1 and row["speedup"] > 0, row
    assert "| goodput schedule, k <= |" in result.stdout
    modes = results["modes"]  # --quick runs them too, on the tiny pair, at 1 and 2 streams
    assert {"config", "target_only_tokens_per_s", "pipelining", "adaptive", "goodput", "concurrency"} <= modes.keys()
    assert [row["streams"] for row in modes["concurrency"]] == modes["config"]["concurrency"]
    for row in modes["pipelining"]:
        assert row["num_drafts"] > 0 and row["sequential_drafted_ahead"] == 0, row
        assert row["sequential_overhead_p50_ms"] > 0, row  # every sequential round waits for its whole block
        assert row["sequential_target_overhead_p50_ms"] > 0 and row["pipelined_target_overhead_p50_ms"] > 0, row
    for row in modes["concurrency"]:
        assert 1 <= row["mean_batch_size"] <= row["streams"], row
    assert 0 < results["grpc_rtt"]["p50_ms"] <= results["grpc_rtt"]["p95_ms"]
    assert results["grpc_rtt"]["idle_p50_ms"] > 0
    for row in [*modes["pipelining"], modes["adaptive"], modes["goodput"], *modes["concurrency"]]:
        assert row["same_tokens_as_baseline"] and row["fallbacks"] == 0, row
    assert "| streams |" in result.stdout
    deep_draft = modes["deep_draft"]  # pipelined vs sequential on the deep-draft pairs
    assert [(row["acceptance_knob"], row["k"]) for row in deep_draft["rows"]] == [
        (acceptance, k) for acceptance in deep_draft["config"]["acceptances"] for k in deep_draft["config"]["ks"]]
    for row in deep_draft["rows"]:
        assert row["same_tokens_as_baseline"] and row["fallbacks"] == 0, row
        assert row["num_drafts"] > 0 and row["sequential_drafted_ahead"] == 0, row
        assert row["draft_wait_p50_ms"] > 0 and row["verify_p50_ms"] > 0, row
    assert "pipelined vs sequential on the tiny-deep-draft pairs" in result.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_bench_with_the_target_on_a_gpu_says_there_is_none(capsys, tmp_path):
    from splitspec.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--target-device", "cuda", "--quick", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--target-device cuda: no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_bench_cuda_mode_is_skipped_without_a_gpu(capsys, tmp_path):
    from splitspec.bench.__main__ import main

    assert main(["--device", "cuda", "--output", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_forced_acceptance_decoding_counts():
    """The GPU mode's loop, on tiny CPU models: alpha 1 accepts every draft token, alpha 0 none."""
    target = CausalLMRunner(demo_models.build_llama(0, 256, num_layers=2))
    draft = CausalLMRunner(demo_models.build_llama(1, 256, num_layers=1))
    generator = torch.Generator().manual_seed(0)
    prompt = [5, 6, 7, 8]
    always = cuda.decode_forced(target, draft, prompt, 20, 3, 1.0, generator)
    assert (always["generated_tokens"], always["rounds"]) == (20, 5)
    assert always["num_accepted_tokens"] == always["num_draft_tokens"] == 15
    never = cuda.decode_forced(target, draft, prompt, 20, 3, 0.0, generator)
    assert (never["generated_tokens"], never["num_accepted_tokens"], never["rounds"]) == (20, 0, 20)
    half = cuda.decode_forced(target, draft, prompt, 300, 4, 0.5, generator)
    # accepted / drafted = (0.5 + 0.25 + 0.125 + 0.0625) / 4 = 0.23 in expectation
    assert 0.15 < half["num_accepted_tokens"] / half["num_draft_tokens"] < 0.32


def test_cpus_split_between_the_halves():
    from splitspec.launch import split_cpus

    assert split_cpus([0]) == ([0], [0])
    assert split_cpus([0, 1]) == ([0], [1])
    assert split_cpus(list(range(8))) == ([0, 1], [2, 3, 4, 5, 6, 7])  # a CPU target does the heavy passes
    assert split_cpus([0, 1], target_on_gpu=True) == ([0], [1])
    assert split_cpus(list(range(16)), target_on_gpu=True) == (list(range(14)), [14, 15])
