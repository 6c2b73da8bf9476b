"""vLLM-style offline inference: `LLM(model=..., speculative_model=...).generate(prompts, sampling_params)`.

How it runs:
- The target engine (`TargetEngine`, the one `splitspec-target` serves) lives in this process: on the GPU when
  there is one, else on the CPU in float32.
- The draft, when `speculative_model` is given: with `cpu_draft_worker=True`, a draft server in a pinned child
  process (`python -m draft_server`); otherwise a `DraftEngine` in this process on the target's device. Either way
  the target talks to it through the draft protocol over a Unix domain socket, as to a remote draft server.
- The engine's asyncio loop runs in a daemon thread for the LLM's whole life: the gRPC channels, the in-process
  draft server and the draft probes live on it. `generate` hands it one coroutine for the whole batch and blocks on
  the result; a Ctrl-C cancels the batch's requests and leaves the LLM usable. The prompts of a batch run
  concurrently, up to `max_num_seqs` at a time: their forward passes take turns on the target's model thread
  (they are not batched), and drafting overlaps verification.
- `close()`, leaving a `with` block (an exception included), garbage collection and interpreter exit all stop the
  draft child and the loop. The child also exits by itself when this process dies, SIGKILL included, even while a
  fork of this process lives on. A fork (multiprocessing, DataLoader workers) cannot use the LLM, and its exit
  leaves the LLM alone.
"""

import asyncio
import dataclasses
import difflib
import inspect
import itertools
import logging
import os
import random
import sys
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING

from splitspec.draft_worker import DraftWorkerProcess, InProcessDraft
from splitspec.llm_types import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams, parse_prompts

if TYPE_CHECKING:
    import torch

    from target_server.request import GenerationRequest

log = logging.getLogger(__name__)

DEFAULT_NUM_SPECULATIVE_TOKENS = 4
DRAFT_STARTUP_TIMEOUT_S = 300.0
# A draft worker that died is started again by the next generate(), this many times in an LLM's life at most.
MAX_DRAFT_WORKER_RESTARTS = 3

# vLLM arguments that have no meaning here (memory, parallelism, scheduling, compilation...): accepted so that vLLM
# code runs unchanged, and ignored with a warning.
VLLM_ONLY_ARGUMENTS = frozenset({
    "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "allowed_local_media_path", "tensor_parallel_size",
    "pipeline_parallel_size", "quantization", "revision", "code_revision", "tokenizer_revision",
    "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager", "max_seq_len_to_capture",
    "max_model_len", "disable_custom_all_reduce", "disable_async_output_proc", "hf_overrides", "mm_processor_kwargs",
    "task", "override_pooler_config", "compilation_config", "use_v2_block_manager", "block_size",
    "enable_prefix_caching", "enable_chunked_prefill", "max_num_batched_tokens", "kv_cache_dtype", "load_format",
    "download_dir", "distributed_executor_backend", "worker_use_ray", "num_scheduler_steps", "disable_log_stats",
    "max_logprobs", "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "preemption_mode",
    "scheduler_delay_factor", "guided_decoding_backend", "disable_sliding_window", "rope_scaling", "rope_theta",
    "speculative_draft_tensor_parallel_size", "speculative_max_model_len", "speculative_disable_by_batch_size",
    "speculative_disable_mqa_scorer", "spec_decoding_acceptance_method",
    "typical_acceptance_sampler_posterior_threshold", "typical_acceptance_sampler_posterior_alpha",
    "ngram_prompt_lookup_max", "ngram_prompt_lookup_min", "model_loader_extra_config", "served_model_name",
})


class _Runtime:
    """What an LLM runs: the loop thread, the engine and the draft. It holds no reference to its LLM, so an LLM
    that is dropped gets collected, and its finalizer (`close`) runs."""

    def __init__(self):
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="splitspec-llm", daemon=True)
        self.thread.start()
        self.draft: DraftWorkerProcess | InProcessDraft | None = None
        self.draft_restarts = 0
        self.pool = None
        self.engine = None

    def revive_draft_worker(self) -> None:
        """Start a draft worker that died again, so that the LLM does not decode on the target alone for the rest
        of its life; up to MAX_DRAFT_WORKER_RESTARTS times. A worker that does not come back leaves the requests to
        the target alone, as before."""
        draft = self.draft
        if not isinstance(draft, DraftWorkerProcess) or not draft.exited():
            return
        if self.draft_restarts >= MAX_DRAFT_WORKER_RESTARTS:
            return
        self.draft_restarts += 1
        log.warning("the draft worker exited with code %s: starting it again (%d of %d)", draft.process.returncode,
                    self.draft_restarts, MAX_DRAFT_WORKER_RESTARTS)
        draft.restart()
        try:
            draft.wait_until_serving(DRAFT_STARTUP_TIMEOUT_S)
        except RuntimeError as exc:
            log.error("the draft worker did not come back (%s): decoding on the target alone", exc)
            return
        self.run(self.pool.reconnect())

    def run(self, coroutine):
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            # A Ctrl-C lands here, in the caller's thread: cancel the coroutine so its requests end with it.
            future.cancel()
            raise

    async def _close_on_loop(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if isinstance(self.draft, InProcessDraft):
            await self.draft.stop()
        # Requests of a generate() that a Ctrl-C abandoned may still be unwinding: end them before the loop stops.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def close(self) -> None:
        """Release everything; a step that fails is logged and the next ones still run. In a fork of the process that
        made it (whose exit runs the finalizer too), nothing: the loop thread is not there, the draft worker and its
        socket directory are the parent's."""
        if os.getpid() != self.pid:
            return

        def close_on_loop():
            if self.loop.is_running():
                asyncio.run_coroutine_threadsafe(self._close_on_loop(), self.loop).result(timeout=30)

        def stop_loop():
            if self.engine is not None:
                self.engine.shutdown()
            if self.loop.is_running():
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(timeout=10)
            if not self.thread.is_alive():
                self.loop.close()

        def stop_worker():
            if isinstance(self.draft, DraftWorkerProcess):
                self.draft.stop()

        for step in (close_on_loop, stop_loop, stop_worker):
            try:
                step()
            except Exception:  # noqa: BLE001 - closing goes on; the failure is logged
                log.exception("closing splitspec.LLM: %s failed", step.__name__)


def _check_vllm_arguments(vllm_args: dict, known: list[str]) -> None:
    for name in vllm_args:
        if name not in VLLM_ONLY_ARGUMENTS:
            close = difflib.get_close_matches(name, [*known, *VLLM_ONLY_ARGUMENTS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"LLM() got an unexpected keyword argument {name!r}{hint}")
    if vllm_args:
        warnings.warn(f"LLM(): ignoring vLLM arguments that splitspec does not use: {', '.join(sorted(vllm_args))}",
                      UserWarning, stacklevel=3)


def _speculation(model: str | None, num_tokens: int | None, config: dict | None) -> tuple[str | None, int]:
    """The draft model and its block size, from vLLM's older spelling (speculative_model=, num_speculative_tokens=)
    or its newer one (speculative_config={"model": ..., "num_speculative_tokens": ...})."""
    config = dict(config or {})
    if model is not None and config.get("model") not in (None, model):
        raise ValueError("speculative_model and speculative_config['model'] name different models")
    model = config.pop("model", model)
    num_tokens = config.pop("num_speculative_tokens", num_tokens)
    if config:
        warnings.warn(f"LLM(): ignoring speculative_config keys: {', '.join(sorted(config))}", UserWarning,
                      stacklevel=3)
    if model is None:
        if num_tokens:
            raise ValueError("num_speculative_tokens needs a speculative_model")
        return None, 0
    if num_tokens is None:
        return model, DEFAULT_NUM_SPECULATIVE_TOKENS
    if num_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1 with a speculative_model, got {num_tokens}")
    return model, num_tokens


@dataclasses.dataclass
class _Prepared:
    """One prompt of a generate() call, validated and ready for the engine."""

    prompt: str | None
    params: SamplingParams
    request: "GenerationRequest"


class LLM:
    """A target model, optionally with a draft model, for offline generation (vLLM's `LLM`).

    model / tokenizer: Hugging Face ids or local directories. speculative_model: the draft model, which must share
    the target's vocabulary; num_speculative_tokens: draft tokens per verification round (default 4).
    speculative_config={"model": ..., "num_speculative_tokens": ...} (vLLM's newer spelling) works too.
    cpu_draft_worker: run the draft in a child process pinned to `draft_cpus` ("0-7" or a list) and
    `draft_numa_node`, with the dtype best for this CPU; else in this process on the target's device. The child
    inherits this process's CPU affinity and pins only within it (by default: all of it, or the node's part).
    num_speculative_tokens_schedule: "constant" (default), "heuristic" or "goodput", as the target server's
    --num-speculative-tokens-schedule (goodput profiles the target's forwards when the LLM starts).
    device: "auto" (CUDA when present, else the CPU), "cpu", "cuda", "cuda:N". dtype: "auto" (bfloat16 or float16
    on a GPU, float32 on the CPU), "float32" ("float"), "bfloat16", "float16" ("half"), or the torch dtype. seed:
    seeds the requests whose SamplingParams have none, in order (None: fresh randomness). max_num_seqs: most prompts
    in flight at once.
    Other vLLM arguments are accepted and ignored with a warning; an unknown one raises TypeError.
    """

    def __init__(self, model: str, speculative_model: str | None = None, num_speculative_tokens: int | None = None,
                 cpu_draft_worker: bool = False, tokenizer: str | None = None, dtype: "str | torch.dtype" = "auto",
                 device: str = "auto", seed: int | None = 0, draft_cpus: str | list[int] | None = None,
                 draft_numa_node: int | None = None, max_num_seqs: int = 8, speculative_config: dict | None = None,
                 num_speculative_tokens_schedule: str = "constant", **vllm_args):
        known = [p for p in inspect.signature(LLM.__init__).parameters if p not in ("self", "vllm_args")]
        _check_vllm_arguments(vllm_args, known)
        speculative_model, num_speculative_tokens = _speculation(speculative_model, num_speculative_tokens,
                                                                 speculative_config)
        if cpu_draft_worker and speculative_model is None:
            raise ValueError("cpu_draft_worker=True needs a speculative_model")
        if (draft_cpus is not None or draft_numa_node is not None) and not cpu_draft_worker:
            raise ValueError("draft_cpus and draft_numa_node pin the draft worker: set cpu_draft_worker=True")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        from target_server.block_size import SCHEDULES

        if num_speculative_tokens_schedule not in SCHEDULES:
            raise ValueError(f"num_speculative_tokens_schedule must be one of {', '.join(SCHEDULES)}, "
                             f"got {num_speculative_tokens_schedule!r}")
        self.num_speculative_tokens_schedule = num_speculative_tokens_schedule
        from splitspec import models
        from splitspec.topology import parse_cpu_list

        if isinstance(draft_cpus, str):
            draft_cpus = parse_cpu_list(draft_cpus)
        self.device = models.resolve_device(device)
        self.dtype = models.resolve_dtype(dtype, self.device)
        self.model = model
        self.speculative_model = speculative_model
        self.num_speculative_tokens = num_speculative_tokens
        self.max_num_seqs = max_num_seqs
        self._seeds = random.Random(seed) if seed is not None else None
        self._request_ids = itertools.count()
        self._runtime = _Runtime()
        self._finalizer = weakref.finalize(self, self._runtime.close)
        try:
            self._start(tokenizer, cpu_draft_worker, draft_cpus, draft_numa_node)
        except BaseException:
            self.close()
            raise

    def _start(self, tokenizer: str | None, cpu_draft_worker: bool, draft_cpus: list[int] | None,
               draft_numa_node: int | None) -> None:
        from splitspec import models
        from splitspec.server_cli import build_runner
        from target_server.admission import Admission
        from target_server.block_size import measure_verify_profile
        from target_server.cli import build_parser
        from target_server.draft_pool import DraftPool
        from target_server.engine import TargetEngine
        from target_server.request import Limits

        runtime, k = self._runtime, self.num_speculative_tokens
        if cpu_draft_worker:
            # Started first, so that the child loads the draft while this process loads the target.
            runtime.draft = DraftWorkerProcess(self.speculative_model, k, draft_cpus, draft_numa_node)
        target = models.load_causal_lm(self.model, self.device, self.dtype)
        self.tokenizer = models.load_tokenizer(tokenizer or self.model, required=True)
        vocabulary = models.vocabulary_of(target, self.tokenizer)
        if cpu_draft_worker:
            runtime.draft.wait_until_serving(DRAFT_STARTUP_TIMEOUT_S)
        elif self.speculative_model is not None:
            runtime.draft = InProcessDraft(self.speculative_model, self.device, self.dtype, k)
            runtime.run(runtime.draft.start())

        async def start_pool():  # on the loop: gRPC aio channels belong to the loop they are made on
            pool = DraftPool([runtime.draft.address] if runtime.draft else [], vocabulary)
            await pool.start()
            return pool

        runtime.pool = runtime.run(start_pool())
        for endpoint in runtime.pool.endpoints:
            if not endpoint.connected:
                raise ValueError(f"speculative_model {self.speculative_model!r} cannot draft for {self.model!r}: "
                                 f"{endpoint.error}")
        defaults = build_parser()
        runner = build_runner(target, log)
        # Without a draft every round is target-only, whatever the schedule.
        schedule = self.num_speculative_tokens_schedule if runtime.draft else "constant"
        verify_profile = measure_verify_profile(runner, k + 1) if schedule == "goodput" else None
        # generate() sends at most max_num_seqs requests at once; the engine runs as many and queues, rather than
        # refuses, any beyond them (another thread's generate(), a batch that a Ctrl-C cancelled still unwinding).
        admission = Admission(max_running=self.max_num_seqs, max_waiting=sys.maxsize)
        runtime.engine = TargetEngine(runner, self.tokenizer, vocabulary, runtime.pool,
                                      defaults.get_default("draft_timeout"), admission=admission,
                                      num_speculative_tokens_schedule=schedule, verify_profile=verify_profile,
                                      max_batch_size=defaults.get_default("max_num_seqs"),
                                      max_batch_tokens=defaults.get_default("max_num_batched_tokens"),
                                      batch_regroup_fraction=defaults.get_default("batch_regroup_fraction"))
        self._limits = Limits(vocab_size=vocabulary.vocab_size, max_context_tokens=models.max_context_tokens(target),
                              num_speculative_tokens=k, max_num_speculative_tokens=k)

    @property
    def draft_worker_pid(self) -> int | None:
        """The process id of the draft worker (cpu_draft_worker=True), else None."""
        draft = self._runtime.draft
        return draft.pid if isinstance(draft, DraftWorkerProcess) else None

    def get_tokenizer(self):
        return self.tokenizer

    def close(self) -> None:
        """Stop the draft worker and the engine's loop. Idempotent; also runs on garbage collection and at exit."""
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. `prompts`: a string, a list of token ids, a dict with "prompt" or
        "prompt_token_ids" (vLLM's TextPrompt / TokensPrompt), or a list of these. `sampling_params`: one for all
        prompts or one per prompt; None means SamplingParams() (vLLM's defaults). `use_tqdm` is accepted, unused."""
        if not self._finalizer.alive:
            raise RuntimeError("this LLM is closed")
        if os.getpid() != self._runtime.pid:
            raise RuntimeError(f"this LLM belongs to process {self._runtime.pid}: a forked process cannot use it")
        prompts = parse_prompts(prompts)
        self._runtime.revive_draft_worker()
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise TypeError("sampling_params: expected a SamplingParams, a list of them (one per prompt) or None, got "
                            f"{type(sampling_params).__name__}")
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling_params: give one for all "
                             "prompts or one per prompt")
        prepared = [self._prepare(i, text, ids, params)
                    for i, ((text, ids), params) in enumerate(zip(prompts, sampling_params))]
        return self._runtime.run(self._generate_all(prepared, time.time()))

    def _prepare(self, index: int, text: str | None, token_ids: list[int] | None,
                 params: SamplingParams) -> _Prepared:
        from splitspec_client.v1 import target_pb2

        from splitspec import wire
        from splitspec.errors import InvalidArgument
        from splitspec.sampling import SamplingParams as EngineSampling
        from target_server.request import from_pb

        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params[{index}]: expected splitspec.SamplingParams, got {type(params).__name__}")
        if token_ids is None:
            token_ids = self.tokenizer.encode(text)
        elif bad := [t for t in token_ids if not 0 <= t < self._limits.vocab_size]:
            # Before from_pb checks it: an id past int32 fails in building the message, in protobuf's words.
            raise ValueError(f"prompt {index}: token ids must be in [0, {self._limits.vocab_size}), got {bad[:5]}")
        # Per request, so that a batch's outputs do not depend on how its requests interleave.
        seed = params.seed if params.seed is not None or self._seeds is None else self._seeds.getrandbits(63)
        # A top_k past the vocabulary keeps all tokens, as in vLLM (and the wire's top_k is an int32).
        top_k = min(max(params.top_k, 0), self._limits.vocab_size)
        sampling = (EngineSampling(seed=seed) if params.greedy else
                    EngineSampling(temperature=params.temperature, top_k=top_k, top_p=params.top_p, seed=seed))
        # As in vLLM, generation ends at the model's context: max_tokens is capped to what is left of it.
        room = self._limits.max_context_tokens - len(token_ids)
        max_new_tokens = max(1, room if params.max_tokens is None else min(params.max_tokens, room))
        message = target_pb2.GenerateRequest(
            request_id=str(next(self._request_ids)), prompt_token_ids=token_ids, sampling=wire.sampling_to_pb(sampling),
            max_new_tokens=max_new_tokens, stop=params.stop, ignore_eos=params.ignore_eos,
            num_speculative_tokens=self.num_speculative_tokens,
        )
        try:
            request = from_pb(message, self.tokenizer, self._limits)
        except InvalidArgument as exc:
            raise ValueError(f"prompt {index}: {exc.message}") from exc
        return _Prepared(text, params, request)

    async def _generate_all(self, prepared: list[_Prepared], arrival_time: float) -> list[RequestOutput]:
        slots = asyncio.Semaphore(self.max_num_seqs)
        tasks = [asyncio.ensure_future(self._generate_one(p, slots, arrival_time)) for p in prepared]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # after a failure, the other requests do not go on alone
                task.cancel()

    async def _generate_one(self, prepared: _Prepared, slots: asyncio.Semaphore, arrival_time: float) -> RequestOutput:
        async with slots:
            scheduled_time = time.time()
            token_ids: list[int] = []
            text, first_token_time = "", None
            async for update in self._runtime.engine.generate(prepared.request):
                token_ids += update.token_ids
                text += update.text
                first_token_time = first_token_time or time.time()
                final = update
        finished_time = time.time()
        stats = final.stats
        metrics = RequestMetrics(
            arrival_time=arrival_time, first_scheduled_time=scheduled_time, first_token_time=first_token_time,
            last_token_time=finished_time, finished_time=finished_time, time_in_queue=scheduled_time - arrival_time,
            rounds=stats.rounds, num_drafts=stats.num_drafts, num_draft_tokens=stats.num_draft_tokens,
            num_accepted_tokens=stats.num_accepted_tokens,
            num_accepted_tokens_per_pos=tuple(stats.num_accepted_tokens_per_pos),
            acceptance_rate=stats.acceptance_rate, mean_accepted_length=stats.mean_accepted_length,
            draft_server=stats.draft_server, fallback_reason=stats.fallback_reason,
        )
        finish_reason, stop_reason = ("length", None) if final.finish_reason == "length" else ("stop", None)
        if final.finish_reason == "stop_sequence":
            stop_reason = final.stop_string
            if prepared.params.include_stop_str_in_output:
                text += stop_reason
        elif final.finish_reason == "eos_token" and prepared.params.include_stop_str_in_output:
            # The engine leaves the end-of-sequence token out of the text; vLLM puts it back on this flag.
            text += self.tokenizer.decode(token_ids[-1:], skip_special_tokens=True)
        completion = CompletionOutput(index=0, text=text if prepared.params.detokenize else "", token_ids=token_ids,
                                      finish_reason=finish_reason, stop_reason=stop_reason)
        request = prepared.request
        return RequestOutput(request_id=request.request_id, prompt=prepared.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=[completion], finished=True,
                             metrics=metrics)
