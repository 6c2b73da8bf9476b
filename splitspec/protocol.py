"""Domain types of the draft protocol (DraftService.Speculate), shared by both halves.

A session: the target sends a SessionStart, the draft answers with CandidateBlock 0; the target answers each block
with a Verdict that may ask for the next block. See docs/architecture.md for the state machine.
"""

import dataclasses

import torch

from splitspec.models import Vocabulary
from splitspec.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class SessionStart:
    prompt_token_ids: list[int]
    sampling: SamplingParams
    num_speculative_tokens: int
    target_vocabulary: Vocabulary
    request_id: str


@dataclasses.dataclass(frozen=True)
class SparseDistribution:
    """The draft distribution q of one draft token, restricted to its non-zero entries."""

    token_ids: torch.Tensor  # [m] int64
    probs: torch.Tensor  # [m] float32, sums to 1


@dataclasses.dataclass(frozen=True)
class CandidateBlock:
    block_index: int
    start_position: int  # sequence length before the block = position of its first draft token
    token_ids: list[int]
    draft_probs: list[SparseDistribution]  # one per draft token when sampling, empty when greedy
    draft_ns: int


@dataclasses.dataclass(frozen=True)
class Verdict:
    block_index: int
    accepted_len: int
    next_token_id: int  # recovered token at the first rejection, or the bonus token
    rollback_to: int  # start_position + accepted_len: KV entries of the first rollback_to tokens stay valid
    num_speculative_tokens: int  # size of the next block; 0 asks for none
