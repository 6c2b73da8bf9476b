"""The model worker (splitspec.batcher.ForwardBatcher) alone, over scripted runners: which jobs make a batch, what a
failure fails, regrouping a forward's sessions, shutdown. The batched forwards themselves: test_batching.py."""

import asyncio
import time

import grpc
import pytest
import torch

from splitspec.batcher import Continue, ForwardBatcher, _Job
from splitspec.errors import ResourceExhausted
from splitspec.kv_cache import ForwardRow
from target_server import cli as target_cli


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


def test_a_device_out_of_memory_fails_its_jobs_with_resource_exhausted_not_internal():
    """On a GPU the KV pool grows with load until a forward runs out of device memory: that is capacity (a caller
    may retry), not a server bug; the worker keeps serving."""
    class OutOfMemoryRunner(_ScriptedRunner):
        def forward_batch(self, rows):
            if any(row.token_ids[0] < 3 for row in rows):  # tokens 1 and 2: batched together or not
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (scripted)")
            return super().forward_batch(rows)

    def finish_out_of_memory(logits):
        raise torch.OutOfMemoryError("CUDA out of memory (scripted, in a finish)")

    runner = OutOfMemoryRunner()
    batcher = ForwardBatcher(runner, max_batch_size=8, max_batch_tokens=64)

    async def scenario():
        results = await asyncio.gather(batcher.run(ForwardRow(_Sequence(), [1], 1)),
                                       batcher.run(ForwardRow(_Sequence(), [2], 1)), return_exceptions=True)
        results.append((await asyncio.gather(batcher.run(ForwardRow(_Sequence(), [3], 1), finish_out_of_memory),
                                             return_exceptions=True))[0])
        for error in results:
            assert isinstance(error, ResourceExhausted) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "out of memory" in error.message
        assert (await batcher.run(ForwardRow(_Sequence(), [4], 1), lambda logits: int(logits)))[0] == 4
        batcher.shutdown()

    asyncio.run(scenario())


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
