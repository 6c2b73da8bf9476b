"""The target's decoding loop: speculative rounds with a draft server, or target-only decoding without one.

Invariant per session: the target's KV cache holds every sequence token but the last. A round feeds the uncached
last token plus the k draft tokens in one forward pass, which scores all k draft tokens and the bonus position.
"""

import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator

import torch
from prometheus_client import CollectorRegistry
from splitspec_client import RoundTiming  # the wire's round timing, one definition for the SDK and the server

from splitspec.batcher import ForwardBatcher
from splitspec.kv_cache import CausalLMRunner, ForwardRow, Sequence
from splitspec.kv_pool import BatchedCausalLMRunner
from splitspec.metrics import TargetMetrics
from splitspec.models import Vocabulary
from splitspec.protocol import CandidateBlock
from splitspec.sampling import SamplingParams, densify_block, logits_to_probs, make_generator
from splitspec.speculative import Verification, verify_greedy, verify_sampling
from target_server.admission import Admission
from target_server.block_size import BlockSizer, GoodputPrior, GoodputSizer, VerifyProfile, load_cap, make_sizer
from target_server.detokenizer import IncrementalDetokenizer
from target_server.draft_pool import DraftPool
from target_server.request import GenerationRequest
from target_server.speculation import Speculation

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = dataclasses.field(default_factory=list)
    time_to_first_token_ns: int = 0
    total_time_ns: int = 0
    draft_wait_ns: int = 0
    verify_ns: int = 0
    draft_server: str = ""
    fallback_reason: str = ""
    num_drafts_ahead: int = 0
    num_stale_drafts: int = 0
    # Draft sessions that failed (a draft refusing one for holding its most sessions is full, not failed): for the
    # draft_fallback_requests metric, since fallback_reason also names a wait for a full draft.
    draft_failures: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def record_block(self, num_draft_tokens: int, accepted_len: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += accepted_len
        if len(self.num_accepted_tokens_per_pos) < num_draft_tokens:
            self.num_accepted_tokens_per_pos += [0] * (num_draft_tokens - len(self.num_accepted_tokens_per_pos))
        for position in range(accepted_len):
            self.num_accepted_tokens_per_pos[position] += 1


@dataclasses.dataclass
class GenerationUpdate:
    """Tokens accepted in one round and the text they add; the last update has finish_reason and stats."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "length", "eos_token" or "stop_sequence"
    stop_string: str | None = None  # with "stop_sequence": the stop string the text was cut at
    stats: GenerationStats | None = None
    round_timing: RoundTiming | None = None


def verification_row(sequence: Sequence, block: CandidateBlock | None) -> ForwardRow:
    """The forward a round needs: the uncached tokens plus the draft tokens, keeping logits for each draft token and
    the bonus position. With no block it is a plain decoding step."""
    draft_token_ids = block.token_ids if block else []
    return ForwardRow(sequence, sequence.uncached_token_ids() + draft_token_ids, len(draft_token_ids) + 1)


def finish_verification(sequence: Sequence, block: CandidateBlock | None, sampling: SamplingParams,
                        generator: torch.Generator, logits: torch.Tensor) -> Verification:
    """Verify the block against the target's `logits # [k+1, vocab]` from its `verification_row`; keep the accepted
    prefix in the sequence and its cache."""
    draft_token_ids = block.token_ids if block else []
    if sampling.greedy:
        # Compared on the host: the target's k + 1 argmax ids are read from the device once.
        verification = verify_greedy(logits, torch.tensor(draft_token_ids, dtype=torch.long))
    else:
        vocab_size = logits.shape[-1]
        # non_blocking: a copy from the host's ordinary memory is staged at once, and the stream orders the rest.
        drafted = torch.tensor(draft_token_ids, dtype=torch.long).to(logits.device, non_blocking=True)  # [k]
        distributions = block.draft_probs if block else []
        draft_probs = densify_block([q.token_ids for q in distributions], [q.probs for q in distributions],
                                    vocab_size, logits.device)  # [k, vocab]
        verification = verify_sampling(logits_to_probs(logits, sampling), draft_probs, drafted, generator)
    # KV entries of rejected draft tokens are stale: keep the sequence before the block plus the accepted ones.
    start_position = len(sequence.token_ids)
    sequence.truncate_cache(start_position + verification.accepted_len)
    sequence.token_ids += draft_token_ids[: verification.accepted_len] + [verification.next_token_id]
    return verification


def round_tokens(token_ids: list[int], num_generated: int, max_new_tokens: int,
                 eos_token_ids: set[int]) -> tuple[list[int], str | None]:
    """The tokens a round emits, cut after the first end-of-sequence token or at `max_new_tokens`, and why the
    request finishes ("eos_token", "length" or None). Stop strings are the detokenizer's to find."""
    for count, token_id in enumerate(token_ids, 1):
        if token_id in eos_token_ids:
            return token_ids[:count], "eos_token"
        if num_generated + count == max_new_tokens:
            return token_ids[:count], "length"
    return token_ids, None


class TargetEngine:
    def __init__(self, runner: BatchedCausalLMRunner | CausalLMRunner, tokenizer, vocabulary: Vocabulary,
                 pool: DraftPool, draft_timeout_s: float, max_draft_reopens: int = 2,
                 admission: Admission | None = None, metrics: TargetMetrics | None = None, draft_ahead: bool = True,
                 num_speculative_tokens_schedule: str = "constant", verify_profile: VerifyProfile | None = None,
                 speculation_backoff_running: int = 0, max_batch_size: int = 64, max_batch_tokens: int = 4096,
                 batch_regroup_fraction: float = 0.0):
        self.runner = runner
        self.tokenizer = tokenizer
        self.vocabulary = vocabulary
        self.pool = pool
        self.draft_timeout_s = draft_timeout_s
        self.max_draft_reopens = max_draft_reopens
        self.admission = admission or Admission(max_running=1024, max_waiting=0)
        self.metrics = metrics or TargetMetrics(CollectorRegistry())
        self.draft_ahead = draft_ahead
        # target_server.block_size: the schedule of each session's block sizes (goodput needs the profile).
        make_sizer(num_speculative_tokens_schedule, 1, verify_profile)  # a bad schedule fails here, not per request
        self.num_speculative_tokens_schedule = num_speculative_tokens_schedule
        self.verify_profile = verify_profile
        self.goodput_prior = GoodputPrior()
        self.speculation_backoff_running = speculation_backoff_running
        # One model worker; the forwards that sessions wait on at once run as one batch (if the runner can batch).
        self.batcher = ForwardBatcher(runner, max_batch_size, max_batch_tokens, self.metrics.batches.record_batch,
                                      thread_name="target-model", regroup_fraction=batch_regroup_fraction,
                                      on_regroup=self.metrics.batches.record_regroup_wait)
        self.metrics.batches.watch(runner)

    @property
    def live_sessions(self) -> int:
        return self.admission.running

    async def generate(self, request: GenerationRequest, arrived: int | None = None) -> AsyncIterator[GenerationUpdate]:
        """`arrived`: when the request arrived (time.perf_counter_ns), before it was tokenized; default now. The stats'
        time_to_first_token_ns and total_time_ns count from it."""
        arrived = time.perf_counter_ns() if arrived is None else arrived
        async with self.admission.slot():
            async for update in self._generate(request, arrived):
                yield update

    async def _generate(self, request: GenerationRequest, arrived: int) -> AsyncIterator[GenerationUpdate]:
        stats = GenerationStats(prompt_tokens=len(request.prompt_token_ids))
        sequence = self.runner.new_sequence(request.prompt_token_ids)
        generator = make_generator(request.sampling.seed, self.runner.device)
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.stop)
        eos_token_ids = set() if request.ignore_eos else set(self.vocabulary.eos_token_ids)
        speculation = Speculation(self.pool, request, self.vocabulary, self.draft_timeout_s, self.max_draft_reopens,
                                  self.draft_ahead)
        sizer = make_sizer(self.num_speculative_tokens_schedule, request.num_speculative_tokens, self.verify_profile,
                           self.goodput_prior, self.draft_ahead)
        generated: list[int] = []
        try:
            await speculation.open(sequence.token_ids, self._next_block_size(request, sizer, 0))
            # The target caches the prompt while the draft drafts its first block.
            if len(sequence.token_ids) > 1:
                _, prefill_ns, _ = await self.batcher.run(ForwardRow(sequence, sequence.token_ids[:-1], 1))
                stats.verify_ns += prefill_ns
            finish_reason = None
            last_update = arrived
            round_started = time.perf_counter_ns()
            while finish_reason is None:
                waited_from = time.perf_counter_ns()
                num_tokens = self._next_block_size(request, sizer, len(generated))
                waits_for_draft = speculation.waits_for_draft(num_tokens)
                if waits_for_draft:
                    self.batcher.away(sequence)  # the model worker need not hold a batch back for this session
                block = await speculation.next_block(sequence.token_ids, num_tokens)
                # A round that asked no draft for a block waited for none (the proto promises 0 there); a wait that
                # ended without one (a draft timed out or failed) was spent waiting all the same.
                draft_wait_ns = time.perf_counter_ns() - waited_from if waits_for_draft else 0
                stats.draft_wait_ns += draft_wait_ns
                verification, verify_ns, batch_size = await self.batcher.run(
                    verification_row(sequence, block),
                    functools.partial(finish_verification, sequence, block, request.sampling, generator))
                if block is not None:
                    sizer.record(len(block.token_ids), verification.accepted_len, verify_ns, block.draft_ns_per_token)
                new_token_ids = (block.token_ids if block else [])[: verification.accepted_len]
                emitted, finish_reason = round_tokens(new_token_ids + [verification.next_token_id], len(generated),
                                                      request.max_new_tokens, eos_token_ids)
                # The verdict goes first, before the detokenizing and the bookkeeping: the draft drafts the next block
                # meanwhile. A stop string found below ends the session all the same (one block drafted in vain).
                # Rounds are timed verdict to verdict, so the next block's drafting falls within the next round.
                decided = time.perf_counter_ns()
                if finish_reason is None and block is not None:
                    await speculation.send_verdict(block, verification,
                                                   self._next_block_size(request, sizer, len(generated) + len(emitted)))
                stats.rounds += 1
                self.metrics.decode_rounds.labels("speculative" if block else "target_only").inc()
                stats.verify_ns += verify_ns
                if block is not None:
                    stats.num_drafts_ahead += block.drafted_ahead
                    stats.record_block(len(block.token_ids), verification.accepted_len)
                    self.metrics.record_block(len(block.token_ids), verification.accepted_len)
                # The end-of-sequence token that ends the request adds no text, as in vLLM: a tokenizer need not
                # count it special (DeepSeek-Coder's <|EOT|>), and skip_special_tokens would then show it.
                for count, token_id in enumerate(emitted[:-1] if finish_reason == "eos_token" else emitted, 1):
                    detokenizer.add_token(token_id)
                    if detokenizer.stopped:
                        emitted, finish_reason = emitted[:count], "stop_sequence"
                        break
                generated += emitted
                now = time.perf_counter_ns()
                if not stats.time_to_first_token_ns:
                    stats.time_to_first_token_ns = now - arrived
                    self.metrics.record_first_tokens(stats.prompt_tokens, len(emitted),
                                                     stats.time_to_first_token_ns / 1e9)
                else:
                    self.metrics.record_inter_token(len(emitted), (now - last_update) / 1e9)
                last_update = now
                timing = RoundTiming(decided - round_started, draft_wait_ns, block.draft_ns if block else 0,
                                     verify_ns, bool(block and block.drafted_ahead), batch_size,
                                     len(block.token_ids) if block else 0)
                round_started = decided
                # Not timed: the first round (it overlaps the prefills) and one that opened a draft session.
                sizer.record_round(timing.num_draft_tokens, timing.round_ns, verify_ns,
                                   timing.block_draft_ns,
                                   timed=stats.rounds > 1 and (block is None or block.block_index > 0),
                                   drafted_ahead=timing.drafted_ahead)
                if finish_reason:
                    await speculation.close()
                    detokenizer.flush()
                    if detokenizer.stopped:
                        # The stop string ended in text held back until now (an incomplete character, as a lone
                        # byte's U+FFFD): the text is cut there, and the reason must say so.
                        finish_reason = "stop_sequence"
                    stats.generated_tokens = len(generated)
                    stats.total_time_ns = time.perf_counter_ns() - arrived
                    stats.draft_server, stats.fallback_reason = speculation.draft_server, speculation.fallback_reason
                    stats.num_stale_drafts = speculation.stale_blocks
                    stats.draft_failures = speculation.draft_failures
                    self.metrics.record_finish(stats)
                    log.info("request %s finished (%s): %d prompt + %d tokens in %d rounds, acceptance %.2f, %.1f ms%s",
                             request.request_id, finish_reason, stats.prompt_tokens, stats.generated_tokens,
                             stats.rounds, stats.acceptance_rate, stats.total_time_ns / 1e6,
                             f", fallback: {stats.fallback_reason}" if stats.fallback_reason else "",
                             extra={"request_id": request.request_id})
                    yield GenerationUpdate(emitted, detokenizer.take_delta(final=True), finish_reason,
                                           detokenizer.stop_string, stats, timing)
                    return
                yield GenerationUpdate(emitted, detokenizer.take_delta(final=False), round_timing=timing)
        finally:
            sizer.finish()
            self.batcher.release(sequence)
            await speculation.close(cancel=True)

    def _next_block_size(self, request: GenerationRequest, sizer: BlockSizer | GoodputSizer, generated: int) -> int:
        cap = load_cap(request.num_speculative_tokens, self.admission.running, self.speculation_backoff_running)
        return sizer.next_size(request.max_new_tokens - generated, cap)

    def shutdown(self) -> None:
        self.batcher.shutdown()
