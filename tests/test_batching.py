"""Batched verification: many sessions' forwards in one pass over a shared KV pool, exactly as if each ran alone."""

import asyncio
import concurrent.futures
import random
import time
import uuid

import pytest
import torch
from splitspec_client import Client
from transformers import MistralConfig, MistralForCausalLM

from scrape import METRICS_FLAGS, metric, scrape
from servers import start_draft, start_target
from splitspec import kv_cache, kv_pool, models
from splitspec.batcher import ForwardBatcher
from splitspec.kv_cache import CausalLMRunner, ForwardRow
from splitspec.kv_pool import BatchedCausalLMRunner, KVPool, batching_problem, runner_for
from splitspec.sampling import SamplingParams
from target_server.draft_pool import DraftPool
from target_server.engine import TargetEngine
from target_server.request import GenerationRequest
from tiny_models import build_gpt2, build_llama, build_opt

PROMPTS = ["The quick brown fox", "def wrap(text, width=70):", "Beautiful is better than ugly.", "Now is better",
           "import os", "Errors should never pass silently.", "class Wrapper:", "Flat is better than nested."]


def sequence_pairs(alone: CausalLMRunner, batched: BatchedCausalLMRunner, rng: random.Random, count: int = 6):
    """`count` random prompts, each as a sequence of the unbatched runner and one of the pooled runner."""
    pairs = []
    for _ in range(count):
        prompt = [rng.randrange(3, 384) for _ in range(rng.randrange(1, 40))]
        pairs.append((alone.new_sequence(prompt), batched.new_sequence(prompt)))
    return pairs


def extend_both(reference, pooled, rng: random.Random, most: int) -> None:
    """The same 1 to `most` random tokens appended to both sequences of a pair."""
    new_tokens = [rng.randrange(3, 384) for _ in range(rng.randrange(1, most + 1))]
    reference.token_ids += new_tokens
    pooled.token_ids += new_tokens


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pooled_batches_match_one_dynamic_cache_per_sequence(attention, device):
    """Ragged rows (different prefixes, different numbers of fed and kept tokens), random rollbacks, a pool that has
    to grow in slots and length: every row's logits equal its own unbatched forward's."""
    model = build_llama(seed=0).to(device)
    model.config._attn_implementation = attention
    alone = CausalLMRunner(model)
    batched = BatchedCausalLMRunner(model, KVPool(model.config.num_hidden_layers, initial_slots=1,
                                                  initial_capacity=8))
    rng = random.Random(0)
    pairs = sequence_pairs(alone, batched, rng)
    rows_checked = largest_batch = 0
    for _ in range(25):
        rows, expected = [], []
        for reference, pooled in pairs:
            if rng.random() < 0.3:
                continue  # not every session is ready at every step
            extend_both(reference, pooled, rng, 8)
            fed = reference.uncached_token_ids()
            assert pooled.uncached_token_ids() == fed
            keep = rng.randrange(1, len(fed) + 1)
            expected.append(alone.forward(reference, fed, keep))
            rows.append(ForwardRow(pooled, fed, keep))
        if not rows:
            continue
        for want, got in zip(expected, batched.forward_batch(rows)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        rows_checked += len(rows)
        largest_batch = max(largest_batch, len(rows))
        for reference, pooled in pairs:  # roll some back, as a verdict does
            if rng.random() < 0.5:
                keep_tokens = rng.randrange(1, reference.cached_len + 1)
                reference.truncate(keep_tokens)
                pooled.truncate(keep_tokens)
                assert pooled.cached_len == reference.cached_len
    assert rows_checked > 60 and largest_batch >= 5
    keys = batched.pool.keys[0]
    assert keys.shape[0] >= 6 and keys.shape[2] > 8  # grew from 1 slot of 8 positions
    assert keys.device.type == device


def test_a_long_cached_row_batched_with_a_long_prefill_keeps_the_pool_within_the_context():
    """A session 400 tokens in, verifying a block, shares a forward with a 380-token prefill: the short row is padded
    to 380 columns. Its padding stores nothing, so the pool stays at the model's 512 positions instead of doubling
    every slot to 1024 (on a GPU, twice the KV memory of every session); the logits are each row's own."""
    model = build_llama(seed=0, max_positions=512)
    alone = CausalLMRunner(model)
    batched = BatchedCausalLMRunner(model, KVPool(model.config.num_hidden_layers, initial_slots=2,
                                                  initial_capacity=512))
    rng = random.Random(0)
    cached = [rng.randrange(3, 384) for _ in range(400)]
    prompt = [rng.randrange(3, 384) for _ in range(380)]
    (reference_a, pooled_a), (reference_b, pooled_b) = [(alone.new_sequence(p), batched.new_sequence(p))
                                                        for p in (cached, prompt)]
    alone.forward(reference_a, cached, 1)
    batched.forward_batch([ForwardRow(pooled_a, cached, 1)])
    block = [7, 8, 9, 10, 11]
    reference_a.token_ids += block
    pooled_a.token_ids += block
    expected = [alone.forward(reference_a, block, 5), alone.forward(reference_b, prompt, 1)]
    got = batched.forward_batch([ForwardRow(pooled_a, block, 5), ForwardRow(pooled_b, prompt, 1)])
    for want, row_logits in zip(expected, got):
        torch.testing.assert_close(row_logits, want, atol=1e-4, rtol=1e-4)
    assert batched.pool.keys[0].shape[2] == 512


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "one-cache-per-sequence"])
def test_the_batcher_times_a_forward_until_the_device_has_run_it(monkeypatch, pooled):
    """On a GPU a forward returns once queued; a prefill (no finish reads its logits) was timed as its launch, and
    its GPU time billed to the next batch's verify_ns. Emulated here: a device wait of 0.2 s stands for the GPU
    still running the forward (tests/test_gpu.py shows it on a real one)."""
    waited = []

    def slow_device(device):
        time.sleep(0.2)
        waited.append(device)

    monkeypatch.setattr(kv_cache, "wait_for_device", slow_device)
    monkeypatch.setattr(kv_pool, "wait_for_device", slow_device)
    model = build_llama(seed=0)
    runner = BatchedCausalLMRunner(model) if pooled else CausalLMRunner(model)
    batcher = ForwardBatcher(runner, max_batch_size=8, max_batch_tokens=256)
    try:
        _, forward_ns, _ = asyncio.run(batcher.run(ForwardRow(runner.new_sequence([5, 6, 7]), [5, 6, 7], 1)))
    finally:
        batcher.shutdown()
    assert waited == [runner.device] and forward_ns >= 0.2e9


def test_released_slots_are_reused():
    model = build_llama(seed=0)
    runner = BatchedCausalLMRunner(model)
    first, second = runner.new_sequence([5, 6, 7]), runner.new_sequence([8, 9])
    assert {first.slot, second.slot} == {0, 1} and runner.pool.slots_in_use == 2
    slot = first.slot
    first.release()
    first.release()  # idempotent
    assert runner.pool.slots_in_use == 1
    third = runner.new_sequence([1])
    assert third.slot == slot
    with pytest.raises(ValueError, match="two rows"):
        runner.forward_batch([ForwardRow(second, [8], 1), ForwardRow(second, [9], 1)])


def test_models_that_cannot_take_a_4d_mask_fall_back_to_one_cache_per_sequence():
    model = build_llama(seed=0)
    assert batching_problem(model) is None
    assert isinstance(runner_for(model)[0], BatchedCausalLMRunner)
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in batching_problem(model)
    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               sliding_window=16))
    runner, problem = runner_for(sliding)
    assert isinstance(runner, CausalLMRunner) and "sliding-window" in problem
    with pytest.raises(ValueError, match="cannot batch"):
        BatchedCausalLMRunner(sliding)


@pytest.mark.parametrize("build", [build_opt, build_gpt2], ids=["opt", "gpt2"])
def test_other_model_families_batch_and_match_their_unbatched_forwards(build):
    """OPT asks its cache for its length (a pooled batch has one per row) and GPT-2 looks its positions up in a table
    of exactly `n_positions`: both batch, and each row equals its own unbatched forward, up to the last position."""
    model = build(seed=0, max_positions=64)
    runner, problem = runner_for(model)
    assert problem is None and isinstance(runner, BatchedCausalLMRunner)
    alone = CausalLMRunner(model)
    rng = random.Random(1)
    # A row with 40 tokens cached, fed 1, beside a 30-token prefill: padding columns of the long row go past
    # position 63 in the pool; then both rows run up to the model's last position.
    long_prompt, short_prompt = [rng.randrange(3, 384) for _ in range(41)], [rng.randrange(3, 384) for _ in range(30)]
    pairs = [(alone.new_sequence(list(p)), runner.new_sequence(list(p))) for p in (long_prompt, short_prompt)]
    pairs[0][0].token_ids = long_prompt[:40]
    pairs[0][1].token_ids = long_prompt[:40]
    alone.forward(pairs[0][0], long_prompt[:40], 1)
    runner.forward(pairs[0][1], long_prompt[:40], 1)
    pairs[0][0].token_ids.append(long_prompt[40])
    pairs[0][1].token_ids.append(long_prompt[40])
    while len(pairs[0][0].token_ids) < 64 and len(pairs[1][0].token_ids) < 64:
        rows, expected = [], []
        for reference, pooled in pairs:
            fed = reference.uncached_token_ids()
            expected.append(alone.forward(reference, fed, len(fed)))
            rows.append(ForwardRow(pooled, fed, len(fed)))
        for want, got in zip(expected, runner.forward_batch(rows)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for reference, pooled in pairs:
            extend_both(reference, pooled, rng, 3)
            excess = len(reference.token_ids) - 64
            if excess > 0:
                del reference.token_ids[64:], pooled.token_ids[64:]


def test_a_model_whose_batched_forwards_differ_falls_back_to_one_cache_per_sequence():
    """A model family that derives positions from its cache instead of taking position ids (as OPT did before
    transformers honoured them) gives wrong rows in a pooled batch: the start-up check finds it."""
    from transformers import LlamaForCausalLM

    class IgnoresPositionIds(LlamaForCausalLM):
        def forward(self, *args, position_ids=None, **kwargs):
            cache = kwargs.get("cache")
            if cache is not None:
                # Positions as one DynamicCache would give them: after the cache's (here: the shortest row's) length.
                start = cache.get_seq_length()
                position_ids = torch.arange(start, start + kwargs["input_ids"].shape[1])[None]
            return super().forward(*args, position_ids=position_ids, **kwargs)

    model = IgnoresPositionIds(build_llama(seed=0).config).eval()
    runner, problem = runner_for(model)
    assert isinstance(runner, CausalLMRunner) and "differ" in problem

    class FailsBatched(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 4:
                raise NotImplementedError("no 4D masks here")
            return super().forward(*args, **kwargs)

    runner, problem = runner_for(FailsBatched(build_llama(seed=0).config).eval())
    assert isinstance(runner, CausalLMRunner) and "NotImplementedError: no 4D masks here" in problem


def test_concurrent_sessions_batch_and_decode_as_alone_and_cancelled_ones_free_their_slots(model_dirs, reference):
    """The engine in this process, target-only (no draft): 8 sessions at once, 3 cancelled midway. The others equal
    the target alone; forwards carried several sessions; every pool slot comes back."""
    model = models.load_causal_lm(model_dirs["target"], torch.device("cpu"), torch.float32)
    tokenizer = models.load_tokenizer(model_dirs["target"], required=True)
    vocabulary = models.vocabulary_of(model, tokenizer)
    runner = BatchedCausalLMRunner(model)

    async def scenario():
        pool = DraftPool([], vocabulary)
        await pool.start()
        engine = TargetEngine(runner, tokenizer, vocabulary, pool, draft_timeout_s=10, batch_regroup_fraction=0.1)

        async def generate(prompt):
            request = GenerationRequest(str(uuid.uuid4()), tokenizer.encode(prompt), SamplingParams(), 32, (), True, 0)
            token_ids = []
            async for update in engine.generate(request):
                token_ids += update.token_ids
            return token_ids

        tasks = [asyncio.create_task(generate(prompt)) for prompt in PROMPTS]
        await asyncio.sleep(0.05)
        for task in tasks[5:]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        engine.shutdown()
        await pool.close()
        return results, engine

    results, engine = asyncio.run(scenario())
    for prompt, result in zip(PROMPTS[:5], results[:5]):
        assert result == reference(prompt, 32), prompt
    assert all(isinstance(result, asyncio.CancelledError) for result in results[5:])
    assert runner.pool.slots_in_use == 0
    batch_sizes = engine.metrics.batches.batch_size.collect()[0].samples
    total = {s.name: s.value for s in batch_sizes}
    assert total["splitspec:batch_size_sum"] / total["splitspec:batch_size_count"] > 2
    # The worker regrouped the sessions of its forwards (batch_regroup_fraction=0.1), and the metric counts it.
    regroup_wait = engine.metrics.batches.regroup_wait.collect()[0].samples
    assert {s.name: s.value for s in regroup_wait}["splitspec:batch_regroup_wait_seconds_total"] > 0


@pytest.fixture(scope="module")
def batching_draft(model_dirs, log_dir):
    draft = start_draft(model_dirs["related_draft"], log_dir, "batching-draft", *METRICS_FLAGS)
    yield draft
    assert draft.stop() == 0


@pytest.fixture(scope="module")
def batching_target(model_dirs, log_dir, batching_draft):
    target = start_target(model_dirs["target"], log_dir, "batching-target", [batching_draft.address], *METRICS_FLAGS)
    yield target
    assert target.stop() == 0


def _mean_batch(server, before: str, name: str) -> float:
    """Rows per forward pass since the scrape `before`."""
    after = scrape(server)
    forwards = metric(after, f"{name}_count") - metric(before, f"{name}_count")
    return (metric(after, f"{name}_sum") - metric(before, f"{name}_sum")) / forwards


def _at_once(address, prompts, **params):
    def run(prompt):
        with Client(address, timeout=120) as client:
            return list(client.generate(prompt, ignore_eos=True, **params).token_ids)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(run, prompts))


def test_eight_speculative_sessions_verified_together_equal_the_target_alone(batching_target, batching_draft,
                                                                             reference):
    target_before, draft_before = scrape(batching_target), scrape(batching_draft)
    results = _at_once(batching_target.address, PROMPTS, max_new_tokens=40, num_speculative_tokens=3)
    for prompt, token_ids in zip(PROMPTS, results):
        assert token_ids == reference(prompt, 40), prompt
    # Sessions really shared forward passes, on both halves.
    assert _mean_batch(batching_target, target_before, "splitspec:batch_size") > 1.5
    assert _mean_batch(batching_draft, draft_before, "splitspec:draft_batch_size") > 1.5
    # With every session gone, both pools give their memory back.
    deadline = time.monotonic() + 10
    while (metric(scrape(batching_target), "splitspec:kv_cache_bytes") > 0
           or metric(scrape(batching_draft), "splitspec:draft_kv_cache_bytes") > 0):
        assert time.monotonic() < deadline, "the KV pools still hold memory with no session open"
        time.sleep(0.1)


def test_seeded_sampling_is_the_same_batched_or_alone(batching_target):
    params = dict(max_new_tokens=32, num_speculative_tokens=3, temperature=0.9, top_k=50, seed=7)
    alone = [_at_once(batching_target.address, [prompt], **params)[0] for prompt in PROMPTS[:4]]
    assert _at_once(batching_target.address, PROMPTS[:4], **params) == alone
