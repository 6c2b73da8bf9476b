"""A model worker: the forward passes sessions ask for, run together in batches. Both halves have one.

Continuous batching at the granularity of one forward pass (vLLM's and TGI's scheduling, without preemption):
every session waiting on a forward when the worker comes free - on the target a prefill, the verification of a
draft block or a plain decoding step; on the draft one draft token - joins the next batch, up to `max_batch_size` rows and `max_batch_tokens` padded tokens,
and while padding stays under half of the batch's tokens (so a long prefill does not pad every verification to
its length). The oldest waiting session is always in the next batch; nobody waits for a batch to fill.

Each job carries a `finish` function, run on the worker thread with its row's logits right after the forward (the
verification math; the choice of a draft token), which may update the session's sequence. A session has at most
one job in flight.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from splitspec.kv_cache import ForwardRow


@dataclasses.dataclass
class _Job:
    row: ForwardRow
    finish: Callable[[torch.Tensor], Any] | None
    future: asyncio.Future


@dataclasses.dataclass
class _Done:
    result: Any = None
    error: BaseException | None = None


class ForwardBatcher:
    def __init__(self, runner, max_batch_size: int, max_batch_tokens: int,
                 on_batch: Callable[[int, int], None] | None = None, thread_name: str = "model"):
        """`runner`: a kv_pool.BatchedCausalLMRunner, or a kv_cache.CausalLMRunner (rows one after another).
        `on_batch(rows, tokens)` is told each forward's size."""
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be positive")
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._serving: asyncio.Task | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    async def run(self, row: ForwardRow, finish: Callable[[torch.Tensor], Any] | None = None) -> tuple[Any, int, int]:
        """Run `row` in the next batch that takes it; returns what `finish(logits)` returned (None without finish),
        the nanoseconds its batch took and the batch's number of rows."""
        if self._serving is None or self._serving.done():
            self._wakeup = asyncio.Event()
            self._serving = asyncio.get_running_loop().create_task(self._serve(), name="batcher")
        job = _Job(row, finish, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wakeup.set()
        return await job.future

    def take_batch(self) -> list[_Job]:
        """The jobs of the next forward pass, oldest first; the others keep their place in the queue."""
        batch, left = [], collections.deque()
        columns = real_tokens = 0
        while self._queue:
            job = self._queue.popleft()
            if job.future.done() or job.row.sequence.released:
                continue  # its request was cancelled while it waited
            width, real = max(columns, len(job.row.token_ids)), real_tokens + len(job.row.token_ids)
            padded = width * (len(batch) + 1)
            if batch and (len(batch) >= self.max_batch_size or padded > self.max_batch_tokens or padded > 2 * real):
                left.append(job)
                continue
            batch.append(job)
            columns, real_tokens = width, real
        self._queue = left
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                # No forward runs while the batcher waits: the one moment the runner may free its memory.
                self.runner.free_unused_memory()
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self.take_batch()
            if not batch:
                continue
            started = time.perf_counter_ns()
            outcomes = await loop.run_in_executor(self._worker, self._step, batch)
            elapsed = time.perf_counter_ns() - started
            if self.on_batch is not None:
                self.on_batch(len(batch), sum(len(job.row.token_ids) for job in batch))
            for job, outcome in zip(batch, outcomes):
                if job.future.done():
                    continue  # cancelled while its batch ran: what the batch did to its sequence is dropped with it
                if outcome.error is not None:
                    job.future.set_exception(outcome.error)
                else:
                    job.future.set_result((outcome.result, elapsed, len(batch)))

    def _step(self, batch: list[_Job]) -> list[_Done]:
        """On the model worker: one forward over the batch, then each job's finish."""
        try:
            logits = self.runner.forward_batch([job.row for job in batch])
        except Exception as exc:  # noqa: BLE001 (every job of the batch gets the error)
            return [_Done(error=exc) for _ in batch]
        outcomes = []
        for job, row_logits in zip(batch, logits):
            try:
                outcomes.append(_Done(result=job.finish(row_logits) if job.finish else None))
            except Exception as exc:  # noqa: BLE001 (one job's error is its own)
                outcomes.append(_Done(error=exc))
        return outcomes

    def shutdown(self) -> None:
        """Stop serving and cancel the waiting jobs; callable from any thread."""
        if self._serving is not None and not self._serving.get_loop().is_closed():
            self._serving.get_loop().call_soon_threadsafe(self._cancel_all)
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _cancel_all(self) -> None:
        self._serving.cancel()
        while self._queue:
            self._queue.popleft().future.cancel()
