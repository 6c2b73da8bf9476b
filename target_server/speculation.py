"""The draft side of one request, as the target sees it: a link to a draft server that is re-opened on another
(or the same, recovered) draft server after a failure, or given up for target-only decoding.

Nothing here can fail a request: every draft failure ends in `next_block` returning None, which the engine answers
with a plain target decoding step. Output stays identical because the target alone decides every token.
"""

import logging

import torch

from splitspec.models import Vocabulary
from splitspec.protocol import CandidateBlock, SessionStart, Verdict
from splitspec.speculative import Verification
from target_server.draft_pool import DraftLink, DraftLinkError, DraftPool
from target_server.request import GenerationRequest

log = logging.getLogger(__name__)


def block_problem(block: CandidateBlock, greedy: bool, vocab_size: int) -> str | None:
    """Why a block from a draft server cannot be used (a draft is not trusted to be correct)."""
    if not block.token_ids:
        return "a block without draft tokens"
    if any(not 0 <= t < vocab_size for t in block.token_ids):
        return "draft token id out of the vocabulary"
    if greedy:
        return None
    if len(block.draft_probs) != len(block.token_ids):
        return f"{len(block.draft_probs)} draft distributions for {len(block.token_ids)} draft tokens"
    for token_id, q in zip(block.token_ids, block.draft_probs):
        ids, probs = q.token_ids, q.probs
        if ids.shape != probs.shape or ids.numel() == 0:
            return "draft distribution with mismatched or empty ids and probs"
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size or ids.unique().numel() != ids.numel():
            return "draft distribution ids out of the vocabulary or repeated"
        if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or abs(float(probs.sum()) - 1) > 1e-3:
            return "draft distribution probabilities not a distribution"
        if not bool(probs[ids == token_id].gt(0).any()):
            return "draft token has probability 0 under its own distribution"
    return None


class Speculation:
    """One request's draft sessions. `draft_server` and `fallback_reason` feed the request's stats."""

    def __init__(self, pool: DraftPool, request: GenerationRequest, vocabulary: Vocabulary, timeout_s: float,
                 max_reopens: int, draft_ahead: bool):
        self.pool = pool
        self.draft_ahead = draft_ahead
        self.stale_blocks = 0  # blocks drafted ahead on a guess that turned out wrong
        self.verdicts_sent = 0
        self.request = request
        self.vocabulary = vocabulary
        self.timeout_s = timeout_s
        self.reopens_left = max_reopens
        self.link: DraftLink | None = None
        self.draft_server = ""
        self.fallback_reason = ""
        self.draft_failures = 0  # sessions that failed; a refusal as full is none
        self.gave_up = False

    async def open(self, token_ids: list[int], num_tokens: int) -> None:
        """Start a draft session on the sequence so far; it drafts its first block at once."""
        if num_tokens == 0 or self.gave_up:
            return
        start = SessionStart(list(token_ids), self.request.sampling, num_tokens, self.vocabulary,
                             self.request.request_id, self.draft_ahead)
        total_tokens = len(self.request.prompt_token_ids) + self.request.max_new_tokens
        try:
            self.link = await self.pool.open(start, total_tokens)
        except DraftLinkError as exc:
            if exc.full:  # target-only for this round; the next one tries again (no call until a session is free)
                self.fallback_reason = str(exc)
            else:  # after a failed session, its failure first: the first cause, then why no session replaced it
                self._give_up(f"{self.fallback_reason}; then {exc}" if self.draft_failures else str(exc))
            return
        self.draft_server = self.link.address

    def _give_up(self, reason: str) -> None:
        self.gave_up = True
        self.fallback_reason = reason

    async def _failed(self, reason: str, full: bool = False) -> None:
        """The session failed (`full`: its draft refused it for holding its most sessions, a refusal that still
        counts towards the reopens, so that a draft refusing every session costs a request a bounded number of
        calls)."""
        log.warning("request %s: draft failure: %s", self.request.request_id, reason,
                    extra={"request_id": self.request.request_id})
        self.fallback_reason = reason
        link, self.link = self.link, None
        if not full:
            self.draft_failures += 1
            self.pool.report_failure(link.endpoint, reason)
        await link.close(cancel=True)
        if full:  # once closed, so that the refused session is not counted among those the draft holds
            self.pool.report_full(link.endpoint)
        if self.reopens_left <= 0:
            self._give_up(f"{reason} (no more draft sessions for this request)")
        self.reopens_left -= 1

    def waits_for_draft(self, num_tokens: int) -> bool:
        """Whether `next_block(..., num_tokens)` will wait on a draft server (not answer None at once)."""
        return num_tokens > 0 and not self.gave_up

    async def next_block(self, token_ids: list[int], num_tokens: int) -> CandidateBlock | None:
        """The block continuing the sequence `token_ids`, at most `num_tokens` long, or None: decode this step on the
        target alone. Blocks drafted ahead on a wrong guess (another start or preceding token) are skipped.
        Asked for none while a session is open (the load or the schedule changed since its verdict), the session ends
        (it is drafting a block no verdict will answer); asked for some again, a new one opens. It ends half-closed,
        not cancelled: it counts among the draft's sessions until the draft has freed it, so that a session opened
        meanwhile is not refused by a draft at its --max-sessions."""
        if num_tokens == 0 and self.link is not None:
            await self.close()
        while self.waits_for_draft(num_tokens):
            if self.link is None:
                await self.open(token_ids, num_tokens)
                if self.link is None:
                    return None
            link = self.link
            try:
                block = await link.next_block(self.timeout_s)
            except DraftLinkError as exc:
                await self._failed(str(exc), exc.full)
                continue
            if block.start_position != len(token_ids) or block.preceding_token_id != token_ids[-1]:
                self.stale_blocks += 1
                # Drafting one block ahead makes at most one stale block per verdict: more is a broken draft.
                if self.stale_blocks > self.verdicts_sent + 1:
                    await self._failed(f"draft {link.address} keeps sending blocks that continue no sequence")
                continue
            problem = block_problem(block, self.request.sampling.greedy, self.vocabulary.vocab_size)
            if problem is None:
                return block.truncated(num_tokens)
            await self._failed(f"draft {link.address} sent an invalid block: {problem}")
        return None

    async def send_verdict(self, block: CandidateBlock, verification: Verification, next_num_tokens: int) -> None:
        """Answer a block; asks for the next one of `next_num_tokens` (0: the session ends)."""
        if self.link is None:
            return
        verdict = Verdict(
            block_index=block.block_index,
            accepted_len=verification.accepted_len,
            next_token_id=verification.next_token_id,
            rollback_to=block.start_position + verification.accepted_len,
            num_speculative_tokens=self.link.block_size(next_num_tokens),
            num_verified_tokens=len(block.token_ids),
        )
        try:
            await self.link.send_verdict(verdict)
            self.verdicts_sent += 1
        except DraftLinkError as exc:
            await self._failed(str(exc))
            return
        if next_num_tokens == 0:
            await self.close()

    async def close(self, cancel: bool = False) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            await link.close(cancel=cancel)
