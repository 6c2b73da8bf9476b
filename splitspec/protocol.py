"""Domain types of the draft protocol (DraftService.Speculate), shared by both halves.

A session: the target sends a SessionStart, the draft answers with CandidateBlock 0; the target answers each block
it uses with a Verdict that may ask for the next block. With draft_ahead the draft also sends blocks drafted on a
guess, which the target uses or discards. See docs/architecture.md for the state machine.
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
    draft_ahead: bool = False  # keep drafting the next block while the target verifies this one


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
    preceding_token_id: int  # the draft's token at start_position - 1 (its guess, for a block drafted ahead)
    drafted_ahead: bool = False
    num_drafted: int | None = None  # tokens draft_ns covers, when the block was cut shorter (`truncated`)

    def truncated(self, num_tokens: int) -> "CandidateBlock":
        """The block's first `num_tokens` draft tokens: a prefix of draft tokens is itself a valid block. Its draft_ns
        still covers every token drafted."""
        return dataclasses.replace(self, token_ids=self.token_ids[:num_tokens],
                                   draft_probs=self.draft_probs[:num_tokens],
                                   num_drafted=self.num_drafted or len(self.token_ids))

    @property
    def draft_ns_per_token(self) -> float:
        return self.draft_ns / max(1, self.num_drafted or len(self.token_ids))


@dataclasses.dataclass(frozen=True)
class Verdict:
    block_index: int
    accepted_len: int
    next_token_id: int  # recovered token at the first rejection, or the bonus token
    rollback_to: int  # start_position + accepted_len: KV entries of the first rollback_to tokens stay valid
    num_speculative_tokens: int  # size of the next block; 0 asks for none
    num_verified_tokens: int | None = None  # leading draft tokens verified; None: the whole block
