"""`python -m splitspec.bench --device cuda`: the split's timing with the shapes of a real pair, on a GPU machine.

  target - Llama-2-7B's shape (32 layers, width 4096, 32000 tokens), random weights, bfloat16 on the GPU.
  draft  - llama-68m's shape (2 layers, width 768), random weights, float32 on the CPU.

Random weights never agree, so acceptance is forced, as vLLM's synthetic rejection sampling does for timing: each
draft token is accepted with probability alpha, independently of the tokens, and the round's next token is the
target's argmax at that position. The forward passes over both KV caches and the rollbacks are the real ones; it
runs in one process, draft and target one after the other, so it measures compute and not the gRPC hop (the CPU
mode measures that).
"""

import contextlib
import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from splitspec.kv_cache import CausalLMRunner
from splitspec.speculative import ideal_speedup

TARGET_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
DRAFT_68M = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                 num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)
ACCEPTANCES = [0.6, 0.7, 0.8, 0.9]
KS = [2, 4, 8]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_llama(shape: dict, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """Random weights made where they will run, in their dtype (a 7B model never exists in float32)."""
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).eval()


def decode_forced(target: CausalLMRunner, draft: CausalLMRunner, prompt: list[int], max_new_tokens: int, k: int,
                  acceptance: float, generator: torch.Generator) -> dict:
    """Speculative greedy decoding with each draft token accepted with probability `acceptance`; k = 0 is
    target-only decoding. Returns token and round counts and where the time went (ns)."""
    target_sequence = target.new_sequence(prompt)
    target.prefill(target_sequence, len(prompt) - 1)
    draft_sequence = draft.new_sequence(prompt)
    counts = dict(generated_tokens=0, rounds=0, num_draft_tokens=0, num_accepted_tokens=0, draft_ns=0, verify_ns=0)
    started = time.perf_counter_ns()
    while counts["generated_tokens"] < max_new_tokens:
        num_tokens = max(0, min(k, max_new_tokens - counts["generated_tokens"] - 1))
        drafted = []
        draft_started = time.perf_counter_ns()
        for _ in range(num_tokens):
            logits = draft.forward(draft_sequence, draft_sequence.uncached_token_ids(), logits_to_keep=1)  # [1, V]
            drafted.append(int(logits[0].argmax()))
            draft_sequence.token_ids.append(drafted[-1])
        verify_started = time.perf_counter_ns()
        start_position = len(target_sequence.token_ids)
        logits = target.forward(target_sequence, target_sequence.uncached_token_ids() + drafted,
                                logits_to_keep=num_tokens + 1)  # [num_tokens + 1, vocab]
        uniform = torch.rand(num_tokens, generator=generator)  # [num_tokens]
        accepted_len = int(torch.cat([uniform >= acceptance, torch.ones(1, dtype=torch.bool)]).int().argmax())
        next_token_id = int(logits[accepted_len].argmax())  # int() waits for the GPU
        finished = time.perf_counter_ns()
        target_sequence.truncate_cache(start_position + accepted_len)
        target_sequence.token_ids += drafted[:accepted_len] + [next_token_id]
        draft_sequence.truncate(start_position + accepted_len)
        draft_sequence.token_ids.append(next_token_id)
        counts["generated_tokens"] += accepted_len + 1
        counts["rounds"] += 1
        counts["num_draft_tokens"] += num_tokens
        counts["num_accepted_tokens"] += accepted_len
        counts["draft_ns"] += verify_started - draft_started
        counts["verify_ns"] += finished - verify_started
    counts["wall_ns"] = time.perf_counter_ns() - started
    return counts


def sweep_forced(target: CausalLMRunner, draft: CausalLMRunner, prompt: list[int], max_new_tokens: int,
                 acceptances: list[float], ks: list[int], log=print) -> dict:
    """Target-only baseline, then every (alpha, k): speedups against the ideal from the measured c and v(k)."""
    generator = torch.Generator().manual_seed(0)
    decode_forced(target, draft, prompt, 8, max(ks), 0.5, generator)  # warm-up
    baseline = decode_forced(target, draft, prompt, max_new_tokens, 0, 0.0, generator)
    target_step_ns = baseline["verify_ns"] / baseline["rounds"]
    baseline_rate = baseline["generated_tokens"] / baseline["wall_ns"] * 1e9
    log(f"target-only: {baseline_rate:.1f} tok/s, target step {target_step_ns / 1e6:.2f} ms")
    rows = []
    for acceptance in acceptances:
        for k in ks:
            run = decode_forced(target, draft, prompt, max_new_tokens, k, acceptance, generator)
            rate = run["generated_tokens"] / run["wall_ns"] * 1e9
            draft_step_cost = run["draft_ns"] / max(1, run["num_draft_tokens"]) / target_step_ns
            verify_cost = run["verify_ns"] / run["rounds"] / target_step_ns
            ideal = ideal_speedup(acceptance, k, draft_step_cost, verify_cost)
            rows.append(dict(acceptance=acceptance, k=k, tokens_per_s=round(rate, 2),
                             speedup=round(rate / baseline_rate, 3), ideal_speedup=round(ideal, 3),
                             measured_over_ideal=round(rate / baseline_rate / ideal, 3),
                             draft_step_cost=round(draft_step_cost, 4), verify_cost=round(verify_cost, 3),
                             acceptance_rate=round(run["num_accepted_tokens"] / max(1, run["num_draft_tokens"]), 3)))
            log(f"alpha {acceptance:.2f} k={k}: {rate:.1f} tok/s, speedup {rows[-1]['speedup']:.2f}x "
                f"(ideal {ideal:.2f}x; c {draft_step_cost:.3f}, v {verify_cost:.2f})")
    return {"baseline_tokens_per_s": round(baseline_rate, 2), "target_step_ms": round(target_step_ns / 1e6, 3),
            "runs": rows}


def run_cuda(args) -> int:
    if not torch.cuda.is_available():
        print("--device cuda: no CUDA device on this machine; skipped.")
        return 0
    from splitspec.bench.report import write_json

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))  # one CPU left for the GPU's host thread
    print(f"building a 7B-shaped target on {torch.cuda.get_device_name()} and a 68M-shaped draft on the CPU ...",
          flush=True)
    target = CausalLMRunner(random_llama(TARGET_7B, "cuda", torch.bfloat16))
    draft = CausalLMRunner(random_llama(DRAFT_68M, "cpu", torch.float32))
    prompt = torch.randint(3, 32000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    results = sweep_forced(target, draft, prompt, args.max_new_tokens or 128, args.acceptances or ACCEPTANCES,
                           args.ks or KS)
    results["device"] = torch.cuda.get_device_name()
    path = args.output / "bench-cuda.json"
    write_json(results, path)
    print(json.dumps(results["runs"], indent=1))
    print(f"wrote {path}")
    return 0
