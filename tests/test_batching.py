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
from splitspec import models
from splitspec.batcher import Continue, ForwardBatcher, _Job
from splitspec.kv_cache import CausalLMRunner, ForwardRow
from splitspec.kv_pool import BatchedCausalLMRunner, KVPool, batching_problem, runner_for
from splitspec.sampling import SamplingParams
from target_server import cli as target_cli
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


class _Sequence:
    released = False

    def release(self):
        self.released = True


def _queue_jobs(batcher: ForwardBatcher, loop, lengths: list[int]) -> list[asyncio.Future]:
    """Jobs waiting in the batcher's queue, feeding `lengths` tokens each; their futures."""
    futures = []
    for length in lengths:
        futures.append(loop.create_future())
        batcher._queue.append(_Job(ForwardRow(_Sequence(), [1] * length, 1), None, futures[-1]))
    return futures


def test_a_batch_takes_the_oldest_then_what_fits_without_padding_most_of_it():
    loop = asyncio.new_event_loop()
    try:
        batcher = ForwardBatcher(runner=None, max_batch_size=3, max_batch_tokens=64)
        futures = _queue_jobs(batcher, loop, [5, 5, 40, 4, 5, 5, 3])
        futures[1].cancel()  # a cancelled request's job is dropped, and that of a released sequence
        batcher._queue[-1].row.sequence = type("Released", (), {"released": True})()
        batch = batcher.take_batch()
        # 5 (oldest), then 4 and 5 (40 would pad the batch to 3 x 40 > 64 tokens); the size limit stops it at 3.
        assert [len(job.row.token_ids) for job in batch] == [5, 4, 5]
        assert [len(job.row.token_ids) for job in batcher._queue] == [40, 5]
        batch = batcher.take_batch()
        # The oldest always runs: 40 alone, as 2 x 40 would be mostly padding (and over 64 tokens).
        assert [len(job.row.token_ids) for job in batch] == [40]
        assert [len(job.row.token_ids) for job in batcher.take_batch()] == [5]
        assert batcher.take_batch() == []
        # Short rows ride along with a verification row: a little padding is cheaper than another forward.
        batcher.max_batch_size = 8
        _queue_jobs(batcher, loop, [5, 1, 1, 1, 1, 1, 1, 1])
        assert len(batcher.take_batch()) == 8
        with pytest.raises(ValueError):
            ForwardBatcher(runner=None, max_batch_size=0, max_batch_tokens=64)
    finally:
        loop.close()


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


class _ScriptedRunner:
    """A runner that returns row i's logits as a tensor holding its first token id, and fails where told: the
    batcher's scheduling and error handling, apart from any model."""

    def __init__(self):
        self.fail_next = False
        self.batches: list[list[int]] = []

    def forward_batch(self, rows):
        self.batches.append([row.token_ids[0] for row in rows])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA out of memory (scripted)")
        return [torch.tensor([[float(row.token_ids[0])]]) for row in rows]

    def free_unused_memory(self):
        pass


def test_the_model_worker_survives_failures_and_continues_jobs_on_its_thread():
    runner = _ScriptedRunner()
    batcher = ForwardBatcher(runner, max_batch_size=8, max_batch_tokens=64)

    async def scenario():
        # A failed forward fails the jobs of its batch only.
        runner.fail_next = True
        with pytest.raises(RuntimeError, match="scripted"):
            await batcher.run(ForwardRow(_Sequence(), [1], 1), lambda logits: int(logits))
        # A failing finish fails its own job; the others of its batch get their results.
        def bad_finish(logits):
            raise ValueError("bad block")
        results = await asyncio.gather(batcher.run(ForwardRow(_Sequence(), [2], 1), lambda logits: int(logits)),
                                       batcher.run(ForwardRow(_Sequence(), [3], 1), bad_finish),
                                       return_exceptions=True)
        assert results[0][0] == 2 and isinstance(results[1], ValueError)
        # A job continues on the worker: three forwards, one result, their summed time.
        fed = []

        def step(logits):
            fed.append(int(logits))
            return int(logits) if len(fed) == 3 else Continue(ForwardRow(_Sequence(), [10 + len(fed)], 1), step)

        result, forward_ns, batch_size = await batcher.run(ForwardRow(_Sequence(), [10], 1), step)
        assert (result, fed, batch_size) == (12, [10, 11, 12], 1) and forward_ns > 0
        # A bug in the metrics callback fails neither the batch's jobs (continuing ones included) nor the worker.
        batcher.on_batch = lambda rows, tokens: 1 / 0
        fed.clear()
        results = await asyncio.gather(batcher.run(ForwardRow(_Sequence(), [4], 1), lambda logits: int(logits)),
                                       batcher.run(ForwardRow(_Sequence(), [10], 1), step))
        assert [result[0] for result in results] == [4, 12]
        batcher.on_batch = None
        assert (await batcher.run(ForwardRow(_Sequence(), [5], 1), lambda logits: int(logits)))[0] == 5
        batcher.shutdown()
        with pytest.raises(RuntimeError, match="shut down"):
            await batcher.run(ForwardRow(_Sequence(), [6], 1))

    asyncio.run(scenario())
    assert [4, 10] in runner.batches and [5] in runner.batches


class _TimedRunner(_ScriptedRunner):
    """A scripted runner whose forward takes `forward_s`."""

    def __init__(self, forward_s: float):
        super().__init__()
        self.forward_s = forward_s

        self.spans: list[tuple[float, float]] = []  # each forward's start and end (time.monotonic)
        self.regroup_waits: list[float] = []  # what the batcher reports waiting to regroup, in seconds

    def forward_batch(self, rows):
        started = time.monotonic()
        time.sleep(self.forward_s)
        self.spans.append((started, time.monotonic()))
        return super().forward_batch(rows)


def _two_sessions(regroup_fraction: float, late_session: str) -> list[list[int]]:
    """Two sessions of three forwards each, started together; after each result session 1 hands over its next
    forward at once and session 2 50 ms later, having said it is `away` meanwhile when `late_session` is "away",
    and finishing after one forward when it is "released". The rows of each forward, by session."""
    runner = _TimedRunner(forward_s=0.2)
    batcher = ForwardBatcher(runner, max_batch_size=8, max_batch_tokens=64, regroup_fraction=regroup_fraction,
                             on_regroup=runner.regroup_waits.append)

    async def session(token: int, delay_s: float, laps: int):
        sequence = _Sequence()
        for _ in range(laps):
            await batcher.run(ForwardRow(sequence, [token], 1))
            if token == 2 and late_session == "away":
                batcher.away(sequence)
            await asyncio.sleep(delay_s)  # its share of the event loop's bookkeeping
        batcher.release(sequence)

    async def scenario():
        await batcher.run(ForwardRow(_Sequence(), [0], 1))  # the worker thread is up and idle
        runner.batches.clear()
        await asyncio.gather(session(1, 0.0, 3), session(2, 0.05, 1 if late_session == "released" else 3))
        batcher.shutdown()

    asyncio.run(scenario())
    # Each wait is reported, and none outlasts its bound: half a forward.
    assert all(0 <= seconds <= 0.2 * regroup_fraction + 0.05 for seconds in runner.regroup_waits)
    if late_session == "" and regroup_fraction:  # session 2's 50 ms were waited for after each of its forwards
        assert len(runner.regroup_waits) >= 2 and sum(runner.regroup_waits) >= 0.08
    return runner.batches


def test_the_worker_waits_for_a_forwards_sessions_to_come_back_and_batches_them_together_again():
    # Waiting up to half a forward (100 ms) for session 2, 50 ms late: every forward carries both sessions.
    assert [sorted(rows) for rows in _two_sessions(0.5, "")] == [[1, 2]] * 3
    # Without regrouping, session 1 goes alone while session 2 is late, and the sessions drift apart.
    batches = _two_sessions(0.0, "")
    assert batches[0] == [1, 2] and [1] in batches and len(batches) > 3


def test_the_worker_does_not_wait_for_sessions_that_are_away_or_released():
    # Session 2 says it waits for something else (as a target session does for its draft block): not waited for.
    batches = _two_sessions(0.5, "away")
    assert batches[0] == [1, 2] and [1] in batches and len(batches) > 3
    # Session 2 finishes after its first forward: session 1 runs on alone at once.
    runner_batches = _two_sessions(0.5, "released")
    assert runner_batches == [[1, 2], [1], [1]]


def test_the_worker_does_not_hold_a_full_batch_back():
    # One row per forward: with a session waiting in the queue, the worker goes on at once, without waiting the
    # 100 ms session 1 takes to come back (it could wait up to a whole forward).
    runner = _TimedRunner(forward_s=0.1)
    batcher = ForwardBatcher(runner, max_batch_size=1, max_batch_tokens=64, regroup_fraction=1.0)

    async def session(token: int):
        sequence = _Sequence()
        for _ in range(2):
            await batcher.run(ForwardRow(sequence, [token], 1))
            await asyncio.sleep(0.1)
        batcher.release(sequence)

    async def scenario():
        await asyncio.gather(session(1), session(2))
        batcher.shutdown()

    asyncio.run(scenario())
    (_, first_end), (second_start, _) = runner.spans[:2]
    assert [len(rows) for rows in runner.batches] == [1, 1, 1, 1] and second_start - first_end < 0.05


def test_a_worker_that_dies_fails_its_jobs_and_later_ones_instead_of_hanging():
    class Fatal(BaseException):  # not an Exception: past every per-job handler, as a bug in the loop itself would be
        pass

    class BrokenRunner(_ScriptedRunner):
        def forward_batch(self, rows):
            raise Fatal("scripted")

    batcher = ForwardBatcher(BrokenRunner(), max_batch_size=8, max_batch_tokens=64)

    async def scenario():
        with pytest.raises(RuntimeError, match="the model worker died: Fatal: scripted"):
            await asyncio.wait_for(batcher.run(ForwardRow(_Sequence(), [1], 1)), timeout=5)
        with pytest.raises(RuntimeError, match="shut down"):
            await asyncio.wait_for(batcher.run(ForwardRow(_Sequence(), [2], 1)), timeout=5)

    asyncio.run(scenario())


def test_shutdown_during_a_regroup_wait_runs_no_more_forwards():
    runner = _TimedRunner(forward_s=0.2)
    batcher = ForwardBatcher(runner, max_batch_size=8, max_batch_tokens=64, regroup_fraction=1.0)

    async def scenario():
        late = _Sequence()
        await asyncio.gather(batcher.run(ForwardRow(_Sequence(), [1], 1)), batcher.run(ForwardRow(late, [2], 1)))
        # The worker now waits (up to 200 ms) for both sessions to come back; shut down meanwhile.
        waiting = asyncio.ensure_future(batcher.run(ForwardRow(_Sequence(), [3], 1)))
        await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, batcher.shutdown)
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(scenario())
    assert [3] not in runner.batches


def test_a_job_whose_sequence_is_released_while_it_waits_is_cancelled_not_forgotten():
    runner = _TimedRunner(forward_s=0.1)
    batcher = ForwardBatcher(runner, max_batch_size=1, max_batch_tokens=64)

    async def scenario():
        busy = asyncio.ensure_future(batcher.run(ForwardRow(_Sequence(), [1], 1)))
        await asyncio.sleep(0.02)  # the worker is in its forward
        released = _Sequence()
        waiting = asyncio.ensure_future(batcher.run(ForwardRow(released, [2], 1)))
        await asyncio.sleep(0)
        released.release()
        await busy
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, timeout=5)
        batcher.shutdown()

    asyncio.run(scenario())
    assert [2] not in runner.batches


def test_regroup_fraction_is_checked(capsys):
    with pytest.raises(ValueError, match="regroup_fraction"):
        ForwardBatcher(runner=None, max_batch_size=8, max_batch_tokens=64, regroup_fraction=1.5)
    # The server's flag: a usage error, before any model is loaded.
    assert target_cli.main(["--model", "/nonexistent", "--batch-regroup-fraction", "-0.1"]) == 2
    assert "--batch-regroup-fraction must be in [0, 1]" in capsys.readouterr().err
