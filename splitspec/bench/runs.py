"""The systems `make bench` times, each on the same prompts (token ids, so every system sees the same input):

  splitspec    - the target server, verifying blocks from the draft server, streamed through the client SDK;
                 with num_speculative_tokens = 0 it is the baseline, target-only autoregressive decoding.
  hf           - Hugging Face `generate` in this process: target alone, or assisted generation
                 (`assistant_model=`) with the same draft and a constant k.
  draft step   - one draft forward in this process, on the draft server's CPUs and thread count (c, the draft's
                 cost in target steps).
"""

import contextlib
import dataclasses
import os
import statistics
import time

import torch
from splitspec_client import Client

from splitspec import models
from splitspec.kv_pool import runner_for


@dataclasses.dataclass
class Run:
    """One system on every prompt. Counters are sums over the prompts' stats; `round_*` lists have one entry per
    round after each request's first (whose time includes the prefill)."""

    generated_tokens: int = 0
    wall_ns: int = 0
    token_ids: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    rounds: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_drafts_ahead: int = 0
    full_blocks: int = 0  # blocks accepted whole, whatever their size
    verify_ns: int = 0  # the stats' forward time: each request's prefill included
    draft_wait_ns: int = 0
    fallback_reasons: list[str] = dataclasses.field(default_factory=list)
    # Each round's RoundTiming, from the target's stream (rounds after each request's first, which overlaps the
    # prefill): its time, its verify forward, the draft compute it waited for (none for a block drafted ahead) and
    # the rest, the orchestration overhead (exact for a block drafted after the previous verdict, an upper bound
    # for one drafted ahead).
    round_ns: list[int] = dataclasses.field(default_factory=list)
    round_verify_ns: list[int] = dataclasses.field(default_factory=list)
    round_waited_draft_ns: list[int] = dataclasses.field(default_factory=list)
    round_overhead_ns: list[int] = dataclasses.field(default_factory=list)
    round_target_overhead_ns: list[int] = dataclasses.field(default_factory=list)  # the target's own part of it
    round_batch_sizes: list[int] = dataclasses.field(default_factory=list)
    round_num_draft_tokens: list[int] = dataclasses.field(default_factory=list)  # its block's size, 0 without one

    def add_rounds(self, timings) -> None:
        """Record rounds from their RoundTimings (splitspec_client.RoundTiming)."""
        for timing in timings:
            self.round_ns.append(timing.round_ns)
            self.round_verify_ns.append(timing.verify_ns)
            self.round_waited_draft_ns.append(timing.waited_draft_ns)
            self.round_overhead_ns.append(timing.overhead_ns)
            self.round_target_overhead_ns.append(timing.target_overhead_ns)
            self.round_batch_sizes.append(timing.batch_size)
            self.round_num_draft_tokens.append(timing.num_draft_tokens)

    def verify_ns_with_block(self, num_draft_tokens: int) -> list[int]:
        """The verify forwards of the rounds whose block had `num_draft_tokens` tokens (0: target-only steps)."""
        return [verify_ns for verify_ns, size in zip(self.round_verify_ns, self.round_num_draft_tokens)
                if size == num_draft_tokens]

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / (self.wall_ns / 1e9)

    @property
    def alpha(self) -> float:
        """Per-token acceptance probability (the alpha of Leviathan et al.), maximum likelihood: accepted draft
        tokens over accepted plus rejected ones; a block has one rejection unless it was accepted whole, whatever its
        size (short blocks at the end of a request, a schedule's varying ones). (The stats' acceptance_rate,
        accepted / drafted, also counts the tokens after a rejection.)"""
        rejections = self.num_drafts - self.full_blocks
        total = self.num_accepted_tokens + rejections
        return self.num_accepted_tokens / total if total else 0.0


def run_splitspec(client: Client, prompts: list[list[int]], max_new_tokens: int, k: int) -> Run:
    """Stream every prompt through the target server; each chunk of the stream is one verification round."""
    run = Run()
    for prompt in prompts:
        token_ids, timings, stats = [], [], None
        started = time.perf_counter_ns()
        for chunk in client.stream(prompt, max_new_tokens=max_new_tokens, num_speculative_tokens=k, ignore_eos=True):
            token_ids += chunk.token_ids
            timings.append(chunk.round_timing)
            stats = chunk.stats or stats
            # Accepted whole: the round's tokens are the block and the target's next token. With ignore_eos and no
            # stop strings nothing cuts them short (the target sizes a block to fit in max_new_tokens).
            block_size = chunk.round_timing.num_draft_tokens
            run.full_blocks += 0 < block_size == len(chunk.token_ids) - 1
        run.wall_ns += time.perf_counter_ns() - started
        run.generated_tokens += len(token_ids)
        run.token_ids.append(tuple(token_ids))
        for field in ("rounds", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_drafts_ahead",
                      "verify_ns", "draft_wait_ns"):
            setattr(run, field, getattr(run, field) + getattr(stats, field))
        if stats.fallback_reason:
            run.fallback_reasons.append(stats.fallback_reason)
        run.add_rounds(timings[1:])
    return run


def merge(parts: list[Run]) -> Run:
    """One Run from runs of the same system on different prompts (sums and concatenations)."""
    merged = Run()
    for part in parts:
        for field in dataclasses.fields(Run):
            setattr(merged, field.name, getattr(merged, field.name) + getattr(part, field.name))
    return merged


def run_interleaved(systems: dict, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """{key: Run} for `systems` {key: (client, k)}: every system on one prompt, then every system on the next, so
    that drift in the machine's load falls on all of them."""
    per_prompt = {key: [] for key in systems}
    for prompt in prompts:
        for key, (client, k) in systems.items():
            per_prompt[key].append(run_splitspec(client, [prompt], max_new_tokens, k))
    return {key: merge(parts) for key, parts in per_prompt.items()}


@contextlib.contextmanager
def on_cpus(cpus: list[int]):
    """Run this process's torch work on `cpus` with one thread each, as a server pinned to them would."""
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


def load_model(directory: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = models.load_causal_lm(directory, torch.device(device), dtype)
    model.generation_config.eos_token_id = None  # every system generates exactly max_new_tokens
    return model


def measure_step_ns(model: torch.nn.Module, prompt: list[int], steps: int = 24) -> float:
    """Median time of one greedy decoding step after `prompt`, through the servers' forward pass (one row)."""
    runner = runner_for(model)[0]  # the servers' runner
    sequence = runner.new_sequence(prompt)
    runner.prefill(sequence, len(prompt) - 1)
    times = []
    for _ in range(steps):
        started = time.perf_counter_ns()
        logits = runner.forward(sequence, sequence.uncached_token_ids(), logits_to_keep=1)  # [1, vocab]
        times.append(time.perf_counter_ns() - started)
        sequence.token_ids.append(int(logits[0].argmax()))
    return statistics.median(times[2:])


@torch.inference_mode()
def run_hf(target: torch.nn.Module, draft: torch.nn.Module | None, prompts: list[list[int]], max_new_tokens: int,
           k: int) -> Run:
    """Greedy `generate` in this process; with a draft, assisted generation drafting exactly k tokens a round."""
    options = {}
    if draft is not None:
        draft.generation_config.num_assistant_tokens = k
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0  # never stop a draft early
        options["assistant_model"] = draft
    run = Run()
    for prompt in prompts:
        input_ids = torch.tensor([prompt], device=target.device)  # [1, prompt_len]
        started = time.perf_counter_ns()
        output = target.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                                 **options)
        run.wall_ns += time.perf_counter_ns() - started
        run.token_ids.append(tuple(output[0, len(prompt):].tolist()))
        run.generated_tokens += len(run.token_ids[-1])
    return run
