"""What the SDK returns: immutable Python views of the target service's responses, and their conversion from pb.

Field names are the proto's, so a field means the same thing in the proto, here, in metrics and in docs.
Repeated fields become tuples so that every value stays immutable and hashable.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, TypeVar

from .v1 import target_pb2

# TGI's names for why generation ended.
FinishReason = Literal["length", "eos_token", "stop_sequence"]

_FINISH_REASONS: dict[int, FinishReason] = {
    target_pb2.FINISH_REASON_LENGTH: "length",
    target_pb2.FINISH_REASON_EOS_TOKEN: "eos_token",
    target_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}

_T = TypeVar("_T")


def _from_pb(cls: type[_T], pb, **converted) -> _T:
    """Build dataclass `cls` from the same-named fields of `pb`; messages and enums come already `converted`."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in converted:
            value = getattr(pb, field.name)
            values[field.name] = value if isinstance(value, (str, int, float)) else tuple(value)
    return cls(**values, **converted)


def _finish_reason(value: int) -> FinishReason | None:
    # FINISH_REASON_UNSPECIFIED (every stream message but the last) reads as None.
    return _FINISH_REASONS.get(value)


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Counters of one request; see GenerationStats in proto/splitspec/v1/target.proto for each field."""

    prompt_tokens: int
    generated_tokens: int
    rounds: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    num_accepted_tokens_per_pos: tuple[int, ...]
    acceptance_rate: float
    mean_accepted_length: float
    time_to_first_token_ns: int
    total_time_ns: int
    draft_wait_ns: int
    verify_ns: int
    draft_server: str
    fallback_reason: str
    num_drafts_ahead: int
    num_stale_drafts: int

    @property
    def time_to_first_token_s(self) -> float:
        return self.time_to_first_token_ns / 1e9

    @property
    def total_time_s(self) -> float:
        return self.total_time_ns / 1e9

    @classmethod
    def from_pb(cls, pb: target_pb2.GenerationStats) -> GenerationStats:
        return _from_pb(cls, pb)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """A whole completion (`Client.generate`)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None  # None only if the server left it unspecified
    stats: GenerationStats

    @classmethod
    def from_pb(cls, pb: target_pb2.GenerateResponse) -> GenerationResult:
        return _from_pb(
            cls, pb, finish_reason=_finish_reason(pb.finish_reason), stats=GenerationStats.from_pb(pb.stats)
        )


@dataclasses.dataclass(frozen=True)
class RoundTiming:
    """Where the round that produced a chunk spent its time; see RoundTiming in proto/splitspec/v1/target.proto."""

    round_ns: int
    draft_wait_ns: int
    block_draft_ns: int
    verify_ns: int
    drafted_ahead: bool
    batch_size: int
    num_draft_tokens: int = 0  # the block's size (0: a round without one)

    @property
    def waited_draft_ns(self) -> int:
        """The draft's compute this round waited for: the block's, unless it was drafted ahead (while the previous
        round verified), and never more than the round's wait for the block (a stream's first block was drafted
        while the target prefilled, and was there, or nearly, when the round began)."""
        return 0 if self.drafted_ahead else min(self.block_draft_ns, self.draft_wait_ns)

    @property
    def overhead_ns(self) -> int:
        """The round's time outside the draft's and the target's model work (gRPC, event loops, scheduling, the
        target's bookkeeping before its verdict); never negative. Exact for a block drafted after the previous
        verdict. A block drafted ahead overlapped other work and counts none of its drafting; the first block, drafted
        while the target prefilled, counts only what the round waited for it."""
        return self.round_ns - self.verify_ns - self.waited_draft_ns

    @property
    def target_overhead_ns(self) -> int:
        """The target's own part of the overhead: the round's time outside its verify forward and its wait for the
        block (its event loop, its gRPC reads and writes, the hand-overs to its model worker, the bookkeeping before
        the verdict). For a block drafted ahead that was already there, all the round's overhead."""
        return self.round_ns - self.verify_ns - self.draft_wait_ns

    @classmethod
    def from_pb(cls, pb: target_pb2.RoundTiming) -> RoundTiming:
        return _from_pb(cls, pb)


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """Tokens accepted since the previous chunk (`Client.stream`); only the last chunk has finish_reason and stats."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    stats: GenerationStats | None
    round_timing: RoundTiming | None

    @classmethod
    def from_pb(cls, pb: target_pb2.GenerateStreamResponse) -> StreamChunk:
        stats = GenerationStats.from_pb(pb.stats) if pb.HasField("stats") else None
        timing = RoundTiming.from_pb(pb.round_timing) if pb.HasField("round_timing") else None
        return _from_pb(cls, pb, finish_reason=_finish_reason(pb.finish_reason), stats=stats, round_timing=timing)


@dataclasses.dataclass(frozen=True)
class VocabularyInfo:
    """The target model's vocabulary; -1 for a special token the model does not have."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    pad_token_id: int
    tokenizer_fingerprint: str


@dataclasses.dataclass(frozen=True)
class DraftServerStatus:
    """One draft server as the target sees it; `error` says why it is unused when not connected."""

    address: str
    connected: bool
    model: str
    error: str
    live_sessions: int


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """What a target server runs (`Client.info`)."""

    model: str
    device: str
    dtype: str
    vocabulary: VocabularyInfo
    max_context_tokens: int
    num_speculative_tokens: int
    max_num_speculative_tokens: int
    draft_servers: tuple[DraftServerStatus, ...]
    live_sessions: int

    @classmethod
    def from_pb(cls, pb: target_pb2.TargetInfoResponse) -> TargetInfo:
        return _from_pb(
            cls,
            pb,
            vocabulary=_from_pb(VocabularyInfo, pb.vocabulary),
            draft_servers=tuple(_from_pb(DraftServerStatus, server) for server in pb.draft_servers),
        )
