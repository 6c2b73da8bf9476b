"""The offline API: the seed's vLLM snippets, with tiny local models in place of hub ids, give the target's output;
no draft worker outlives its LLM."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from tiny_models import build_mpt, build_tokenizer, copy_with_eos, save

from splitspec import LLM, SamplingParams, models

PROMPTS = [
    "The quick brown fox",
    "def wrap(text, width=70):",
    "Beautiful is better than ugly.",
]
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def is_running(pid: int) -> bool:
    """False once the process is gone or a zombie (an orphan's zombie waits for a reaper we do not control)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not is_running(pid)


@pytest.fixture(scope="module")
def cpu_only_llm(model_dirs):
    # The seed's first snippet: LLM(model=...) alone, on a machine without a GPU.
    with LLM(model=model_dirs["target"]) as llm:
        yield llm


@pytest.fixture(scope="module")
def worker_llm(model_dirs):
    # The seed's second snippet: the draft in a pinned child process, vLLM-only arguments ignored with a warning.
    with pytest.warns(UserWarning, match="use_v2_block_manager"):
        llm = LLM(model=model_dirs["target"], speculative_model=model_dirs["related_draft"],
                  num_speculative_tokens=2, use_v2_block_manager=True, cpu_draft_worker=True)
    pid = llm.draft_worker_pid
    assert is_running(pid)
    # Leaving the with block by an exception, as a Ctrl-C would, stops the worker and reaps it.
    with pytest.raises(KeyboardInterrupt):
        with llm:
            yield llm
            raise KeyboardInterrupt
    assert not is_running(pid)


def test_cpu_only_llm_gives_the_targets_greedy_output(cpu_only_llm, reference):
    assert (cpu_only_llm.device.type, cpu_only_llm.dtype) == ("cpu", torch.float32)
    [output] = cpu_only_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    completion = output.outputs[0]
    assert completion.token_ids == reference(PROMPTS[0], 48)
    assert completion.text == reference.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert (completion.finish_reason, completion.stop_reason, output.finished) == ("length", None, True)
    assert output.prompt == PROMPTS[0] and output.prompt_token_ids == reference.tokenizer.encode(PROMPTS[0])
    assert output.metrics.num_drafts == 0 and output.metrics.fallback_reason == ""


def test_eos_ends_the_output_like_generate_and_reads_stop(cpu_only_llm, reference):
    outputs = cpu_only_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=64))
    for prompt, output in zip(PROMPTS, outputs):
        expected = reference(prompt, 64, ignore_eos=False)
        assert output.outputs[0].token_ids == expected
        assert output.outputs[0].finish_reason == ("stop" if expected[-1] == 2 else "length")


def test_stop_string_cuts_the_text_and_is_the_stop_reason(cpu_only_llm):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    full = cpu_only_llm.generate(PROMPTS[2], params)[0].outputs[0].text
    stop = next(full[i : i + 3] for i in range(5, len(full)) if full[i : i + 3].strip())
    cut = cpu_only_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                                           stop=["never in this text", stop]))[0].outputs[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (full[: full.index(stop)], "stop", stop)
    kept = cpu_only_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=stop,
                                                            include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full[: full.index(stop)] + stop


def test_a_stop_string_holding_a_character_the_prompt_began_is_the_stop_reason(cpu_only_llm,
                                                                             prompt_cut_inside_a_character):
    """The stop_reason is the stop string the engine cut at; it was found again by decoding the output after a few
    prompt tokens, which misplaced the output's start when the prompt ended inside a character."""
    prompt_token_ids, character = prompt_cut_inside_a_character
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=["never in this text", character])
    [output] = cpu_only_llm.generate({"prompt_token_ids": prompt_token_ids}, params)
    completion = output.outputs[0]
    assert (completion.text, completion.finish_reason, completion.stop_reason) == ("", "stop", character)
    assert len(completion.token_ids) == 1


def test_prompts_as_token_ids_and_dicts(cpu_only_llm, reference):
    ids = reference.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = cpu_only_llm.generate([ids, {"prompt_token_ids": ids}, {"prompt": PROMPTS[1]}], params)
    assert [o.outputs[0].token_ids for o in outputs] == [reference(PROMPTS[1], 16)] * 3
    assert [o.prompt for o in outputs] == [None, None, PROMPTS[1]]
    assert len({o.request_id for o in outputs}) == 3


def test_cpu_draft_worker_batch_gives_the_targets_greedy_output(worker_llm, reference):
    outputs = worker_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    assert [o.prompt for o in outputs] == PROMPTS
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == reference(prompt, 48)
        metrics = output.metrics
        assert metrics.draft_server.startswith("unix://") and metrics.fallback_reason == ""
        assert metrics.num_drafts > 0 and metrics.num_draft_tokens <= 2 * metrics.num_drafts
        assert metrics.num_accepted_tokens + metrics.rounds == 48  # each round emits accepted + 1 tokens
        assert metrics.first_token_time <= metrics.finished_time


def test_a_draft_worker_that_died_is_started_again_by_the_next_generate(model_dirs, reference, monkeypatch):
    from splitspec import llm as llm_module

    monkeypatch.setattr(llm_module, "MAX_DRAFT_WORKER_RESTARTS", 1)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(model=model_dirs["target"], speculative_model=model_dirs["related_draft"], num_speculative_tokens=2,
             cpu_draft_worker=True) as llm:
        for _ in range(llm_module.MAX_DRAFT_WORKER_RESTARTS):
            pid = llm.draft_worker_pid
            os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
            deadline = time.monotonic() + 10
            # Until it can be reaped: a killed process shows as a zombie while its other threads still exit.
            while not llm._runtime.draft.exited() and time.monotonic() < deadline:
                time.sleep(0.05)
            output = llm.generate(PROMPTS[0], params)[0]
            assert output.outputs[0].token_ids == reference(PROMPTS[0], 16)
            assert llm.draft_worker_pid != pid and is_running(llm.draft_worker_pid)
            assert output.metrics.num_drafts > 0 and output.metrics.fallback_reason == ""
        # Past the limit, a worker that dies again is left dead: the target decodes alone, with the reason.
        os.kill(llm.draft_worker_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not llm._runtime.draft.exited() and time.monotonic() < deadline:
            time.sleep(0.05)
        output = llm.generate(PROMPTS[0], params)[0]
        assert output.outputs[0].token_ids == reference(PROMPTS[0], 16) and output.metrics.fallback_reason


def test_sampling_with_a_seed_is_reproducible(worker_llm):
    # One prompt per call: the draft worker may run in bfloat16 (--dtype auto), where a request's logits shift with
    # the neighbours its forward passes are batched with; alone, a seed reproduces the output exactly.
    def sample(seed):
        params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=seed, max_tokens=32, ignore_eos=True)
        return [worker_llm.generate(prompt, params)[0].outputs[0].token_ids for prompt in PROMPTS[:2]]

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9))


def test_llm_seed_makes_unseeded_sampling_reproducible(model_dirs):
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)  # vLLM's default temperature, no seed
    runs = []
    for _ in range(2):
        with LLM(model=model_dirs["target"], seed=3) as llm:
            runs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)])
    assert runs[0] == runs[1]


def test_in_process_draft_gives_the_targets_greedy_output(model_dirs, reference):
    with LLM(model=model_dirs["target"], speculative_model=model_dirs["target"], num_speculative_tokens=3) as llm:
        assert llm.draft_worker_pid is None
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == reference(prompt, 32)
        assert output.metrics.acceptance_rate == 1.0  # the target as its own draft
        assert output.metrics.draft_server.startswith("unix://")
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(PROMPTS[0])


def test_goodput_schedule_in_process_keeps_the_targets_greedy_output(model_dirs, reference):
    with LLM(model=model_dirs["target"], speculative_model=model_dirs["unrelated_draft"], num_speculative_tokens=4,
             num_speculative_tokens_schedule="goodput") as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == reference(prompt, 48)
    # The unrelated draft is almost never right: most rounds ran on the target alone.
    rounds = sum(output.metrics.rounds for output in outputs)
    assert sum(output.metrics.num_drafts for output in outputs) < rounds / 2
    with pytest.raises(ValueError, match="num_speculative_tokens_schedule"):
        LLM(model=model_dirs["target"], num_speculative_tokens_schedule="fastest")


def test_a_draft_with_another_vocabulary_is_refused(model_dirs):
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        LLM(model=model_dirs["target"], speculative_model=model_dirs["mismatched_draft"])


KEEP_GENERATING = """
import os, sys, time
from splitspec import LLM, SamplingParams
llm = LLM(model=sys.argv[1], speculative_model=sys.argv[2], num_speculative_tokens=2, cpu_draft_worker=True,
          draft_cpus="0")
fork = os.fork() if sys.argv[3] == "fork" else 0  # as a multiprocessing Pool or a DataLoader would, after the LLM
if fork == 0 and sys.argv[3] == "fork":
    time.sleep(60)
    os._exit(0)
print(llm.draft_worker_pid, fork, flush=True)
while True:
    llm.generate(["The quick brown fox"] * 2, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
"""


def socket_directory_of(worker_pid: int) -> pathlib.Path:
    argv = pathlib.Path(f"/proc/{worker_pid}/cmdline").read_text().split("\0")
    return pathlib.Path(argv[argv.index("--host") + 1].removeprefix("unix://")).parent


@pytest.mark.parametrize("sig, fork", [(signal.SIGINT, False), (signal.SIGKILL, False), (signal.SIGKILL, True)],
                         ids=["ctrl-c", "kill-9", "kill-9-with-a-fork-alive"])
def test_the_worker_does_not_outlive_an_interrupted_or_killed_process(model_dirs, tmp_path, sig, fork):
    """Ctrl-C: KeyboardInterrupt in generate(), then the exit handlers stop the worker. kill -9: no handler runs;
    the worker sees its stdin close, removes its socket's directory and shuts itself down; a fork of the killed
    process, still running, holds no copy of that stdin."""
    log = open(tmp_path / "script.log", "w")
    script = subprocess.Popen([sys.executable, "-c", KEEP_GENERATING, model_dirs["target"], model_dirs["related_draft"],
                               "fork" if fork else "-"], stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    fork_pid = 0
    try:
        pid, fork_pid = map(int, script.stdout.readline().split() or (0, 0))
        assert pid, (tmp_path / "script.log").read_text()
        directory = socket_directory_of(pid)
        time.sleep(1.0)  # inside generate()
        assert is_running(pid) and directory.is_dir()
        script.send_signal(sig)
        assert script.wait(30) != 0
        assert wait_gone(pid), f"draft worker {pid} outlived its parent"
        assert not directory.exists()
        assert not fork or is_running(fork_pid)
    finally:
        script.kill()
        script.wait()
        if fork_pid:
            os.kill(fork_pid, signal.SIGKILL)
        log.close()


FORK_AND_EXIT = """
import json, os, sys, time
from splitspec import LLM, SamplingParams
llm = LLM(model=sys.argv[1], speculative_model=sys.argv[2], num_speculative_tokens=2, cpu_draft_worker=True,
          draft_cpus="0")
directory = os.path.dirname(llm._runtime.draft.address.removeprefix("unix://"))
started = time.monotonic()
if os.fork() == 0:  # a helper process that exits normally: its atexit hooks run, the LLM's finalizer among them
    try:
        llm.generate("The quick brown fox")
    except RuntimeError as exc:
        print(json.dumps({"fork_error": str(exc)}), flush=True)
    sys.exit(0)
os.wait()
exit_s = time.monotonic() - started
output = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
print(json.dumps({"exit_s": exit_s, "directory": sorted(os.listdir(directory)), "drafts": output.metrics.num_drafts,
                  "fallback": output.metrics.fallback_reason}), flush=True)
llm.close()
"""


def test_a_fork_that_exits_leaves_the_llm_alone(model_dirs):
    """The fork's exit neither waits on the parent's loop thread (absent in the fork) nor removes the parent's
    socket directory; and the fork cannot generate with the parent's LLM."""
    script = subprocess.run([sys.executable, "-c", FORK_AND_EXIT, model_dirs["target"], model_dirs["related_draft"]],
                            capture_output=True, cwd=REPO_ROOT, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert script.returncode == 0, script.stderr
    fork, parent = (json.loads(line) for line in script.stdout.splitlines())
    assert "a forked process cannot use it" in fork["fork_error"]
    assert parent["exit_s"] < 10  # torch's exit takes about a second; a wait on the absent loop thread, 30
    assert parent["directory"] == ["draft.sock"]
    assert parent["drafts"] > 0 and parent["fallback"] == ""


def test_a_misspelled_argument_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"'speculative_modle'.*did you mean 'speculative_model'"):
        LLM(model="unused", speculative_modle="unused")


def test_vllm_only_arguments_are_ignored_with_a_warning(model_dirs):
    with pytest.warns(UserWarning, match="enforce_eager, gpu_memory_utilization, tensor_parallel_size"):
        llm = LLM(model=model_dirs["target"], gpu_memory_utilization=0.5, enforce_eager=True, tensor_parallel_size=1)
    llm.close()


@pytest.mark.parametrize("kwargs, problem", [
    ({"n": 2}, "n must be 1"),
    ({"presence_penalty": 0.5}, "presence_penalty=0.5 is not supported"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_sampling_params_refuse_what_splitspec_cannot_honour(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        SamplingParams(**kwargs)


def test_generate_checks_its_arguments(cpu_only_llm):
    with pytest.raises(ValueError, match="2 prompts but 1 sampling_params"):
        cpu_only_llm.generate(PROMPTS[:2], [SamplingParams()])
    with pytest.raises(ValueError, match="prompt 0: prompt.*leave no room"):
        cpu_only_llm.generate([[5] * 600])


def test_without_an_eos_in_its_configs_the_tokenizers_ends_the_output(model_dirs, tmp_path, reference):
    directory = copy_with_eos(model_dirs["target"], tmp_path / "no-eos", None)
    with LLM(model=directory) as llm:
        assert llm.tokenizer.eos_token_id == 2
        output = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    expected = reference(PROMPTS[2], 64, ignore_eos=False)
    assert expected[-1] == 2 and len(expected) < 64  # this prompt meets the EOS
    assert (output.token_ids, output.finish_reason) == (expected, "stop")


def test_an_eos_the_tokenizer_does_not_count_special_adds_no_text(model_dirs, tmp_path, reference):
    """As in vLLM, the end-of-sequence token that ends the output leaves no text, even when the tokenizer does not
    count it special (DeepSeek-Coder's <|EOT|>) and skip_special_tokens keeps it; include_stop_str_in_output puts it
    back. The target as its own draft: the EOS comes inside an accepted block, with draft tokens after it."""
    decode = reference.tokenizer.decode
    greedy = reference(PROMPTS[1], 16)
    eos = next(t for t in greedy[2:] if decode([t]).strip().isprintable())  # a plain token that shows as text
    expected = greedy[: greedy.index(eos) + 1]
    directory = copy_with_eos(model_dirs["target"], tmp_path / "plain-eos", eos)
    with LLM(model=directory, speculative_model=directory, num_speculative_tokens=8) as llm:
        [output] = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=16))
        [kept] = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=16, include_stop_str_in_output=True))
    completion = output.outputs[0]
    assert (completion.token_ids, completion.finish_reason, completion.stop_reason) == (expected, "stop", None)
    assert completion.text == decode(expected[:-1]) and decode([eos]) not in completion.text
    assert output.metrics.num_accepted_tokens >= len(expected)  # the block went on past the EOS
    assert kept.outputs[0].text == decode(expected)


@pytest.mark.parametrize("config, context", [
    ({"max_position_embeddings": 512}, 512),
    ({"n_positions": 48}, 48),  # GPT-2
    ({"max_seq_len": 32}, 32),  # MPT
    ({"seq_length": 64, "max_position_embeddings": 128}, 64),  # ChatGLM-style: the smaller holds
    ({}, 1 << 20),
])
def test_the_context_comes_from_the_keys_vllm_reads(config, context):
    assert models.max_context_tokens(types.SimpleNamespace(config=types.SimpleNamespace(**config))) == context


def test_an_mpt_generates_up_to_its_context_and_refuses_longer_prompts(tmp_path):
    with LLM(model=save(build_mpt(seed=0, max_positions=32), build_tokenizer(), tmp_path / "mpt")) as llm:
        [output] = llm.generate([[5] * 10], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
        assert (len(output.outputs[0].token_ids), output.outputs[0].finish_reason) == (22, "length")
        with pytest.raises(ValueError, match="prompt 0: prompt: 40 tokens leave no room in the model's context of 32"):
            llm.generate([[5] * 40], SamplingParams(max_tokens=4))


def test_max_num_seqs_past_the_engines_default_admission(model_dirs):
    with LLM(model=model_dirs["target"], max_num_seqs=1100) as llm:
        outputs = llm.generate([[5, 6]] * 1100, SamplingParams(temperature=0, max_tokens=1))
    assert len(outputs) == 1100 and {len(o.outputs[0].token_ids) for o in outputs} == {1}


@pytest.mark.parametrize("requested, dtype", [
    ("auto", torch.float32), ("float32", torch.float32), ("float", torch.float32), ("half", torch.float16),
    ("float16", torch.float16), ("bfloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16),
])
def test_dtype_takes_vllms_spellings(requested, dtype):
    assert models.resolve_dtype(requested, torch.device("cpu")) == dtype


def test_a_local_model_path_that_is_no_directory_is_named_as_such(tmp_path):
    for model_id in ("gpt2", "Qwen/Qwen2-0.5B", str(tmp_path), tmp_path):  # hub ids, then a directory: not refused
        models.check_local_path(model_id)
    for model_id in (str(tmp_path / "missing"), "./missing", "../missing", "~/missing", "models/owner/name"):
        with pytest.raises(OSError, match=f"^{re.escape(str(model_id))}: no such directory"):
            models.check_local_path(model_id)


def test_a_bad_dtype_is_named_without_a_command_line_flag():
    for dtype in ("fp8", torch.int8):
        with pytest.raises(ValueError, match=r"^dtype '(fp8|torch\.int8)': choose one of auto, float32"):
            LLM(model="unused", dtype=dtype)


@pytest.mark.parametrize("kwargs, error, problem", [
    ({"max_tokens": 4.0}, TypeError, "max_tokens must be an int or None, got 4.0"),
    ({"max_tokens": "4"}, TypeError, "max_tokens must be an int or None, got '4'"),
    ({"temperature": "0.5"}, TypeError, "temperature must be a number"),
    ({"stop": [5]}, TypeError, "stop must be a string or a list of strings"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
])
def test_sampling_params_name_an_argument_of_the_wrong_type(kwargs, error, problem):
    with pytest.raises(error, match=problem):
        SamplingParams(**kwargs)


def test_generate_names_a_bad_prompt_or_sampling_params(cpu_only_llm):
    with pytest.raises(TypeError, match="prompts: expected a string, .* got NoneType"):
        cpu_only_llm.generate(None)
    with pytest.raises(TypeError, match="prompts: expected a string, .* got int"):
        cpu_only_llm.generate(5)
    with pytest.raises(TypeError, match=r"prompts: .* got Tensor; pass token ids as a list \(\.tolist\(\)\)"):
        cpu_only_llm.generate(torch.tensor([5, 6]))
    with pytest.raises(TypeError, match="sampling_params: expected a SamplingParams, .* got generator"):
        cpu_only_llm.generate(["a", "b"], (SamplingParams() for _ in range(2)))
    for ids in ([2**31, 5], [-1, 5]):
        with pytest.raises(ValueError, match=rf"prompt 0: token ids must be in \[0, 384\), got \[{ids[0]}\]"):
            cpu_only_llm.generate(ids)
    with pytest.raises(TypeError, match=r"prompt 0: token ids must be ints, got tensor\(5\)"):
        cpu_only_llm.generate({"prompt_token_ids": torch.tensor([5, 6])})


def test_numpy_token_ids_and_a_top_k_past_the_vocabulary_are_taken(cpu_only_llm):
    numpy = pytest.importorskip("numpy")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = cpu_only_llm.generate([5, 6], greedy)[0].outputs[0].token_ids
    for prompt in ([numpy.int64(5), 6], {"prompt_token_ids": numpy.array([5, 6])}):
        assert cpu_only_llm.generate(prompt, greedy)[0].outputs[0].token_ids == expected
    sampled = [cpu_only_llm.generate([5, 6], SamplingParams(top_k=top_k, seed=3, max_tokens=16, ignore_eos=True))
               [0].outputs[0].token_ids for top_k in (-1, 2**40)]
    assert sampled[0] == sampled[1]


def test_the_worker_removes_only_the_directory_its_socket_is_in(tmp_path, capsys):
    from draft_server import cli

    argv = ["--model", "/nonexistent", "--exit-when-stdin-closes", "--remove-when-stdin-closes", str(tmp_path)]
    assert cli.main([*argv, "--host", f"unix://{tmp_path}/below/draft.sock"]) == 2
    assert cli.main([*argv, "--host", "127.0.0.1"]) == 2
    assert capsys.readouterr().err.count("--remove-when-stdin-closes DIR needs") == 2
    # Never a tree: what else is in the directory keeps it there.
    (tmp_path / "draft.sock").touch()
    (tmp_path / "other").touch()
    cli._remove_socket_directory(str(tmp_path / "draft.sock"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
