"""TargetService: message -> domain object -> engine call -> message."""

import asyncio
import concurrent.futures
import dataclasses
import time

from splitspec_client.v1 import target_pb2, target_pb2_grpc

from splitspec import wire
from target_server import request as request_types
from target_server.engine import GenerationStats, TargetEngine

# Prompts longer than this are tokenized off the event loop (HF tokenizers release the GIL), so that other streams
# go on meanwhile: a megabyte takes about a second.
TOKENIZE_INLINE_CHARS = 1024

FINISH_REASON_TO_PB = {
    "length": target_pb2.FINISH_REASON_LENGTH,
    "eos_token": target_pb2.FINISH_REASON_EOS_TOKEN,
    "stop_sequence": target_pb2.FINISH_REASON_STOP_SEQUENCE,
}


def stats_to_pb(stats: GenerationStats) -> target_pb2.GenerationStats:
    return target_pb2.GenerationStats(
        prompt_tokens=stats.prompt_tokens,
        generated_tokens=stats.generated_tokens,
        rounds=stats.rounds,
        num_drafts=stats.num_drafts,
        num_draft_tokens=stats.num_draft_tokens,
        num_accepted_tokens=stats.num_accepted_tokens,
        num_accepted_tokens_per_pos=stats.num_accepted_tokens_per_pos,
        acceptance_rate=stats.acceptance_rate,
        mean_accepted_length=stats.mean_accepted_length,
        time_to_first_token_ns=stats.time_to_first_token_ns,
        total_time_ns=stats.total_time_ns,
        draft_wait_ns=stats.draft_wait_ns,
        verify_ns=stats.verify_ns,
        draft_server=stats.draft_server,
        fallback_reason=stats.fallback_reason,
        num_drafts_ahead=stats.num_drafts_ahead,
        num_stale_drafts=stats.num_stale_drafts,
    )


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, engine: TargetEngine, limits: request_types.Limits, model: str, dtype: str):
        self.engine = engine
        self.limits = limits
        self.model = model
        self.dtype = dtype
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    async def _request(self, message) -> request_types.GenerationRequest:
        if len(message.prompt) <= TOKENIZE_INLINE_CHARS:
            return request_types.from_pb(message, self.engine.tokenizer, self.limits)
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizing, request_types.from_pb, message, self.engine.tokenizer, self.limits)

    async def Generate(self, message, context):
        arrived = time.perf_counter_ns()  # the stats' times count from here: tokenizing a long prompt takes a while
        response = target_pb2.GenerateResponse()
        async for update in self.engine.generate(await self._request(message), arrived):
            response.token_ids.extend(update.token_ids)
            response.text += update.text
            if update.finish_reason is not None:
                response.finish_reason = FINISH_REASON_TO_PB[update.finish_reason]
                response.stats.CopyFrom(stats_to_pb(update.stats))
        return response

    async def GenerateStream(self, message, context):
        arrived = time.perf_counter_ns()
        async for update in self.engine.generate(await self._request(message), arrived):
            chunk = target_pb2.GenerateStreamResponse(token_ids=update.token_ids, text=update.text)
            if update.round_timing is not None:
                chunk.round_timing.CopyFrom(target_pb2.RoundTiming(**dataclasses.asdict(update.round_timing)))
            if update.finish_reason is not None:
                chunk.finish_reason = FINISH_REASON_TO_PB[update.finish_reason]
                chunk.stats.CopyFrom(stats_to_pb(update.stats))
            yield chunk

    async def Info(self, message, context):
        return target_pb2.TargetInfoResponse(
            model=self.model,
            device=str(self.engine.runner.device),
            dtype=self.dtype,
            vocabulary=wire.vocabulary_to_pb(self.engine.vocabulary),
            max_context_tokens=self.limits.max_context_tokens,
            num_speculative_tokens=self.limits.num_speculative_tokens,
            max_num_speculative_tokens=self.limits.max_num_speculative_tokens,
            draft_servers=[
                target_pb2.DraftServerStatus(address=e.address, connected=e.connected, model=e.model, error=e.error,
                                             live_sessions=e.live_sessions)
                for e in self.engine.pool.endpoints
            ],
            live_sessions=self.engine.live_sessions,
        )
