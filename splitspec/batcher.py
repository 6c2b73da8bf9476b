"""A model worker: the forward passes sessions ask for, run together in batches. Both halves have one.

Continuous batching at the granularity of one forward pass (vLLM's and TGI's scheduling, without preemption):
every session waiting on a forward when the worker comes free - on the target a prefill, the verification of a
draft block or a plain decoding step; on the draft one draft token - joins the next batch, up to `max_batch_size`
rows and `max_batch_tokens` padded tokens, and while its padding is no more than its real tokens or
`PADDING_ALLOWANCE`, whichever is more (so a long prefill does not pad every verification to its length). The
oldest waiting row is always in the next batch; nobody waits for a batch to fill.

Each job carries a `finish` function, run on the worker thread with its row's logits right after the forward (the
verification math; the choice of a draft token), which may update the session's sequence. `finish` may return
`Continue(row, finish)` to feed the sequence again: the job stays on the worker and joins the next batch without a
trip through the event loop (the draft's k steps of one block). A session has at most one job in flight.

Regrouping (`regroup_fraction`, the target's): the event loop takes a batch's results one session after another,
so its sessions hand over their next forwards one after another too. Were the worker to start at the first one back,
it would run it alone and the rest would form a second, smaller batch; and since a forward of few rows costs nearly
what one of many does (weights are read once per forward), two batches cost nearly twice one. So after a forward the
worker waits, at most `regroup_fraction` of that forward's time, for the sessions it served to come back, except
those that said they wait for something else first (`away`: a target session waiting for its draft block) and
those released.

The worker thread owns the queue and the scheduling; the event loop only hands jobs over and receives results.
"""

import asyncio
import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from splitspec.errors import ResourceExhausted
from splitspec.kv_cache import ForwardRow

log = logging.getLogger(__name__)

# Padding tokens a batch may always carry: a verification row (k + 1 tokens) takes single-token rows along.
PADDING_ALLOWANCE = 32


@dataclasses.dataclass
class Continue:
    """What a job's `finish` returns to run its sequence's next forward at once, on the worker."""

    row: ForwardRow
    finish: Callable[[torch.Tensor], Any]


@dataclasses.dataclass
class _Job:
    row: ForwardRow
    finish: Callable[[torch.Tensor], Any] | None
    future: asyncio.Future
    forward_ns: int = 0  # summed over the job's forwards

    def cancelled(self) -> bool:
        # Read from the worker thread: a plain attribute read of the future's state, as good as a flag.
        return self.future.done() or self.row.sequence.released


class ForwardBatcher:
    def __init__(self, runner, max_batch_size: int, max_batch_tokens: int,
                 on_batch: Callable[[int, int], None] | None = None, thread_name: str = "model",
                 regroup_fraction: float = 0.0, on_regroup: Callable[[float], None] | None = None):
        """`runner`: a kv_pool.BatchedCausalLMRunner, or a kv_cache.CausalLMRunner (rows one after another).
        `on_batch(rows, tokens)` is told each forward's size (on the worker thread). `regroup_fraction`: how long,
        as a fraction of the forward just run, the worker may wait for that forward's sessions to come back (see
        the module's docstring); 0 never waits. `on_regroup(seconds)` is told each such wait (on the worker thread)."""
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be positive")
        if not 0 <= regroup_fraction <= 1:
            raise ValueError("regroup_fraction must be in [0, 1]")
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch
        self.thread_name = thread_name
        self._handed_over: collections.deque[_Job] = collections.deque()  # appended by event loops
        self._queue: collections.deque[_Job] = collections.deque()  # the worker's
        self._work = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.regroup_fraction = regroup_fraction
        self.on_regroup = on_regroup
        # Sessions (by id) of the last forward that the worker may still wait for, and until when (perf_counter_ns).
        # Written by the worker, shrunk by event loops (`away`) under the lock.
        self._returning: dict[int, Any] = {}
        self._regroup_until_ns = 0
        self._running: collections.deque[_Job] = collections.deque()  # the batch in the forward, for `_serve`

    async def run(self, row: ForwardRow, finish: Callable[[torch.Tensor], Any] | None = None) -> tuple[Any, int, int]:
        """Run `row` in the next batch that takes it (and the rows its `finish` continues with); returns what the
        last `finish` returned (None without finish), the nanoseconds of the forward passes it ran in and the
        number of rows of the last one."""
        if self._stopping:
            raise RuntimeError("the model worker is shut down")
        job = _Job(row, finish, asyncio.get_running_loop().create_future())
        self._handed_over.append(job)
        if self._stopping:  # shut down meanwhile: the worker may have drained its queues already
            job.future.cancel()
            raise RuntimeError("the model worker is shut down")
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.thread_name, daemon=True)
                self._thread.start()
        self._work.set()
        return await job.future

    def away(self, sequence) -> None:
        """The sequence waits for something else (its draft block) before its next forward: the worker need not
        wait for it to regroup a batch."""
        if self._returning:
            with self._lock:
                self._returning.pop(id(sequence), None)
            self._work.set()

    def release(self, sequence) -> None:
        """The sequence runs no more forwards: give its cache back, and wake the worker, which frees the runner's
        memory once no sequence holds any."""
        sequence.release()
        self._work.set()

    def take_batch(self) -> list[_Job]:
        """The jobs of the next forward pass, oldest first; the others keep their place in the queue."""
        batch, left = [], collections.deque()
        columns = real_tokens = 0
        while self._queue:
            job = self._queue.popleft()
            if job.cancelled():  # its request was cancelled, or its sequence released, while it waited
                if not job.future.done():  # released: cancel it, so that no awaiter is left waiting
                    self._settle_threadsafe(job.future, job.future.cancel)
                continue
            width, real = max(columns, len(job.row.token_ids)), real_tokens + len(job.row.token_ids)
            padded = width * (len(batch) + 1)
            wasted = padded - real
            if batch and (len(batch) >= self.max_batch_size or padded > self.max_batch_tokens
                          or wasted > max(real, PADDING_ALLOWANCE)):
                left.append(job)
                continue
            batch.append(job)
            columns, real_tokens = width, real
        self._queue = left
        return batch

    def _serve(self) -> None:
        """The worker thread: batch, run, deliver; continuing jobs go to the front of the queue. Should the loop
        itself fail (a bug outside any one job's forward), the worker stops for good and every job it holds fails
        with the reason, as do later ones: a hang would be worse."""
        error = None
        try:
            self._serve_until_stopped()
        except BaseException as exc:  # noqa: BLE001
            log.critical("model worker %s died; its jobs fail from now on", self.thread_name, exc_info=True)
            error = RuntimeError(f"the model worker died: {type(exc).__name__}: {exc}")
        finally:
            self._stopping = True
            for queue in (self._running, self._handed_over, self._queue):
                while queue:
                    future = queue.popleft().future
                    settle = future.cancel if error is None else functools.partial(_fail, future, error)
                    self._settle_threadsafe(future, settle)

    def _take_handed_over(self) -> None:
        while self._handed_over:
            self._queue.append(self._handed_over.popleft())

    def _serve_until_stopped(self) -> None:
        while not self._stopping:
            self._take_handed_over()
            if self._queue and self._returning:
                self._regroup()
                if self._stopping:
                    break
            batch = self.take_batch()
            if not batch:
                # No forward runs now: the one moment the runner may free its memory.
                self.runner.free_unused_memory()
                self._work.wait()
                self._work.clear()
                continue
            self._running.extend(batch)
            try:
                self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 (a bug here must fail these jobs, not every later one)
                log.exception("model worker %s: batch of %d failed", self.thread_name, len(batch))
                for job in batch:
                    self._deliver(job, None, exc, len(batch))
            self._running.clear()

    def _regroup(self) -> None:
        """Wait until every session of the last forward is back in the queue, away or released, or until the
        regrouping time is up, or the queue holds a full batch."""
        started = time.perf_counter_ns()
        while True:
            # Cleared before the state is read: a wake-up (release, away) from now on ends the wait below.
            self._work.clear()
            queued = {id(job.row.sequence) for job in self._queue}
            with self._lock:
                self._returning = {key: sequence for key, sequence in self._returning.items()
                                   if key not in queued and not sequence.released}
                left_ns = self._regroup_until_ns - time.perf_counter_ns()
                if (not self._returning or left_ns <= 0 or self._stopping
                        or len(self._queue) >= self.max_batch_size):
                    self._returning = {}
                    break
            if not self._handed_over:
                self._work.wait(left_ns / 1e9)
            self._take_handed_over()
        if self.on_regroup is not None:  # metrics never fail the worker
            try:
                self.on_regroup((time.perf_counter_ns() - started) / 1e9)
            except Exception:  # noqa: BLE001
                log.exception("model worker %s: the regroup metrics callback failed", self.thread_name)

    def _run_batch(self, batch: list[_Job]) -> None:
        started = time.perf_counter_ns()
        outcomes = self._step(batch)
        finished = time.perf_counter_ns()
        elapsed = finished - started
        num_tokens = sum(len(job.row.token_ids) for job in batch)
        continuing = []
        if self.regroup_fraction:
            # Before any result goes out, so that none comes back before it is waited for.
            with self._lock:
                self._returning = {id(job.row.sequence): job.row.sequence for job, (result, _) in zip(batch, outcomes)
                                   if not isinstance(result, Continue)}
                self._regroup_until_ns = finished + int(self.regroup_fraction * elapsed)
        for job, (result, error) in zip(batch, outcomes):
            job.forward_ns += elapsed
            if isinstance(result, Continue):
                job.row, job.finish = result.row, result.finish
                continuing.append(job)
            else:
                self._deliver(job, result, error, len(batch))
        self._queue.extendleft(reversed(continuing))
        if self.on_batch is not None:  # after the results are on their way; metrics never fail a job
            try:
                self.on_batch(len(batch), num_tokens)
            except Exception:  # noqa: BLE001
                log.exception("model worker %s: the batch metrics callback failed", self.thread_name)

    def _step(self, batch: list[_Job]) -> list[tuple[Any, BaseException | None]]:
        """One forward over the batch, then each job's finish."""
        try:
            logits = self.runner.forward_batch([job.row for job in batch])
        except Exception as exc:  # noqa: BLE001 (every job of the batch gets the error)
            error = self._capacity_error(exc, len(batch))
            return [(None, error) for _ in batch]
        outcomes = []
        for job, row_logits in zip(batch, logits):
            try:
                outcomes.append((job.finish(row_logits) if job.finish else None, None))
            except Exception as exc:  # noqa: BLE001 (one job's error is its own)
                outcomes.append((None, self._capacity_error(exc, 1)))
        return outcomes

    def _capacity_error(self, exc: Exception, rows: int) -> Exception:
        """A device out of memory is load, not a bug: RESOURCE_EXHAUSTED, which a caller may retry (INTERNAL,
        anything else's status, says the server is broken). torch frees its cached blocks and retries before it
        raises: the memory is taken, mostly by the KV pool, which grows with the sessions running and their lengths."""
        if not isinstance(exc, torch.OutOfMemoryError):
            return exc
        log.warning("model worker %s: out of device memory in a forward of %d rows: %s", self.thread_name, rows, exc)
        error = ResourceExhausted(f"the model's device is out of memory under the current load; retry later ({exc})")
        error.__cause__ = exc  # the offline LLM raises it: torch's error stays in the traceback
        return error

    @staticmethod
    def _deliver(job: _Job, result: Any, error: BaseException | None, batch_size: int) -> None:
        def settle():
            if job.future.done():
                return  # cancelled while its batch ran: what the batch did to its sequence is dropped with it
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result((result, job.forward_ns, batch_size))

        ForwardBatcher._settle_threadsafe(job.future, settle)

    @staticmethod
    def _settle_threadsafe(future: asyncio.Future, settle: Callable[[], Any]) -> None:
        """Run `settle` on the future's event loop, unless that loop is gone (its awaiter with it)."""
        try:
            future.get_loop().call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed
            pass

    def shutdown(self, wait_s: float = 30.0) -> None:
        """Stop the worker after its current forward; it cancels the jobs still waiting. Callable from any thread.
        Waits up to `wait_s` for the worker thread to end: a daemon thread still inside torch when the interpreter
        exits can abort the process."""
        self._stopping = True
        self._work.set()
        with self._lock:
            thread = self._thread
            if thread is None:  # never started: nothing else will cancel what was handed over
                while self._handed_over:
                    future = self._handed_over.popleft().future
                    self._settle_threadsafe(future, future.cancel)
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait_s)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
