"""Draft sessions: one KV cache per session, candidate blocks out, verdicts in.

All model work runs on one worker thread (splitspec.batcher): the draft owns its pinned CPUs, and one forward pass
at a time using all of their threads beats several passes fighting over them. Sessions drafting at the same time
share those passes: each draft token is one row of a batch, the sessions' caches slots of one KV pool.
"""

import collections
import dataclasses
import itertools
import logging
import secrets

import torch
from prometheus_client import CollectorRegistry

from splitspec.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from splitspec.batcher import Continue, ForwardBatcher
from splitspec.kv_cache import ForwardRow, Sequence
from splitspec.metrics import DraftMetrics
from splitspec.models import Vocabulary
from splitspec.protocol import CandidateBlock, SessionStart, SparseDistribution, Verdict
from splitspec.speculative import DecayedAcceptance, draft_ahead_pays
from splitspec.sampling import SamplingParams, logits_to_probs, make_generator, sample_sparse, sparse_distribution

log = logging.getLogger(__name__)

# Drafting ahead (DraftSession.drafting_ahead_pays): the per-token acceptance estimate starts at 0.8 (4 accepted, 1
# rejected) at the first verdict, each verdict's weight decays by AHEAD_DECAY, and a block is drafted ahead when its
# chance of being used is at least speculative.DRAFT_AHEAD_MIN_CHANCE, 0.2 (alpha >= 0.72 at k = 4, 0.84 at k = 8):
# above the break-even of its latency alone, 1 / (2k + 1) (a chance p saves k draft steps, 1 - p costs half of one on
# average), leaving room for the draft compute a wasted block takes from other sessions.
AHEAD_PRIOR = (4.0, 1.0)
AHEAD_DECAY = 0.9


@dataclasses.dataclass(frozen=True)
class DraftLimits:
    max_num_speculative_tokens: int
    max_context_tokens: int
    max_draft_support: int  # most entries of a sparse draft distribution sent on the wire
    max_sessions: int


class DraftSession:
    """The draft's view of one sequence. Not thread-safe: the engine runs its steps one at a time.

    Blocks sent and not yet answered are `open_blocks`: the oldest awaits its verdict; with draft-ahead a second one
    rests on the guess that the first is fully accepted and followed by `ahead_guess`.
    """

    def __init__(self, session_id: int, start: SessionStart, sequence: Sequence, limits: DraftLimits,
                 device: torch.device):
        self.session_id = session_id
        self.request_id = start.request_id
        self.sampling: SamplingParams = start.sampling
        self.draft_ahead = start.draft_ahead
        self.sequence = sequence
        self.limits = limits
        # On the model's device: splitspec.LLM runs an in-process draft on the target's device, a GPU included.
        self.generator = make_generator(None, device)
        # Each position's draft token gets its own random stream: a seeded request then gives the same output
        # whether or not a block drafted ahead was cut short by a verdict, and no position's randomness is judged
        # twice (a rejected position gets the target's token, later blocks start after it).
        self.seed = start.sampling.seed if start.sampling.seed is not None else secrets.randbits(62)
        self.next_block_index = 0
        self.open_blocks: collections.deque[CandidateBlock] = collections.deque()
        self.ahead_guess: int | None = None  # the token the block being drafted ahead assumes the target emits
        # Per-token acceptance of the session's recent blocks, decayed per verdict (see drafting_ahead_pays).
        self.acceptance = DecayedAcceptance(*AHEAD_PRIOR, decay=AHEAD_DECAY)
        self.num_verdicts = 0
        # Set by the event loop when the verdict on the open block arrives while the next block is drafted ahead;
        # the drafting step checks it against its guess (which the event loop may not know yet).
        self.pending_verdict: Verdict | None = None

    def choose_next_token(self, draft_probs: list[SparseDistribution] | None, logits: torch.Tensor) -> int:
        """Choose the next token from the draft's `logits # [1, vocab]` (the greedy guess when `draft_probs` is
        None) and append it to the sequence. Runs on the model worker, right after the forward."""
        logits = logits[0]  # [vocab]
        if self.sampling.greedy or draft_probs is None:
            token_id = int(torch.argmax(logits))
        else:
            ids, probs = sparse_distribution(logits_to_probs(logits, self.sampling), self.limits.max_draft_support)
            self.generator.manual_seed(hash((self.seed, len(self.sequence.token_ids))) & (2**63 - 1))
            # Sample from exactly the compressed q that goes on the wire, so the target's test stays exact.
            draft_probs.append(SparseDistribution(token_ids=ids, probs=probs))
            token_id = sample_sparse(ids, probs, self.generator)
        self.sequence.token_ids.append(token_id)
        return token_id

    async def draft_block(self, batcher: ForwardBatcher, num_tokens: int, ahead: bool = False) -> CandidateBlock | None:
        """Extend the sequence by `num_tokens` draft tokens; the last one is not fed yet (its KV is not needed).

        `ahead`: first guess the target's next token (the draft's argmax after the open block), then draft after
        it. Returns None when abandoned midway (the verdict came and ruled the guess out).
        """
        drafting = _BlockDrafting(self, num_tokens, ahead)
        drafted, model_ns, _ = await batcher.run(drafting.row(), drafting.step)
        if drafted is None:
            return None
        block = CandidateBlock(
            block_index=self.next_block_index,
            start_position=drafting.start_position,
            token_ids=drafting.token_ids,
            draft_probs=drafting.draft_probs,
            draft_ns=model_ns,
            preceding_token_id=self.sequence.token_ids[drafting.start_position - 1],
            drafted_ahead=ahead,
        )
        self.next_block_index += 1
        self.open_blocks.append(block)
        return block

    def keeps_ahead_block(self, verdict: Verdict) -> bool:
        """Whether `verdict` confirms the guess the block drafted ahead rests on."""
        return (bool(self.open_blocks) and verdict.accepted_len == len(self.open_blocks[0].token_ids)
                and verdict.next_token_id == self.ahead_guess)

    def apply_verdict(self, verdict: Verdict, vocab_size: int) -> bool:
        """Keep the accepted draft tokens and the target's token; crop the KV cache to `rollback_to`.

        Returns True when a block drafted ahead stands (the sequence already continues with it).
        """
        block = self.open_blocks[0] if self.open_blocks else None
        if block is None or verdict.block_index != block.block_index:
            expected = "none (no block is open)" if block is None else str(block.block_index)
            raise FailedPrecondition(f"verdict for block {verdict.block_index}, but the open block is {expected}")
        num_verified = verdict.num_verified_tokens or len(block.token_ids)
        if not 1 <= num_verified <= len(block.token_ids):
            raise InvalidArgument(
                "verdict.num_verified_tokens", f"must be in [1, {len(block.token_ids)}] (the block's tokens), "
                f"got {num_verified}"
            )
        if verdict.accepted_len > num_verified:
            raise InvalidArgument(
                "verdict.accepted_len", f"{verdict.accepted_len} exceeds the {num_verified} tokens verified"
            )
        if verdict.rollback_to != block.start_position + verdict.accepted_len:
            raise InvalidArgument(
                "verdict.rollback_to",
                f"must be start_position + accepted_len = {block.start_position + verdict.accepted_len}, "
                f"got {verdict.rollback_to}",
            )
        if not 0 <= verdict.next_token_id < vocab_size:
            raise InvalidArgument("verdict.next_token_id", f"must be in [0, {vocab_size}), got {verdict.next_token_id}")
        ahead_stands = len(self.open_blocks) > 1 and self.keeps_ahead_block(verdict)
        self.num_verdicts += 1
        # A block the target cut short counts its verified tokens only: all of them accepted is no rejection.
        self.acceptance.record(num_verified, verdict.accepted_len)
        self.open_blocks.popleft()
        if not ahead_stands:
            # Whatever was drafted past the verdict (a rejected tail, a block drafted ahead) is stale.
            self.open_blocks.clear()
            self.sequence.truncate(verdict.rollback_to)
            self.sequence.token_ids.append(verdict.next_token_id)
        self.ahead_guess = None
        self.pending_verdict = None
        # The next block starts after the verdict's token, whether or not a block drafted ahead already fills it.
        self.check_block_size("verdict.num_speculative_tokens", verdict.num_speculative_tokens, allow_zero=True,
                              sequence_len=verdict.rollback_to + 1)
        return ahead_stands

    def drafting_ahead_pays(self) -> bool:
        """Whether to draft the next block ahead of the newest open block's verdict. It is used when that
        block is accepted whole and the guess of the target's next token holds, and then saves a round's drafting;
        otherwise it is abandoned at its next step, which delays the next block by at most one draft step (and
        takes draft compute from other sessions, and from the target where they share cores). So it pays unless
        that chance is small. Before the first verdict nothing is known, and the first block is drafted ahead of."""
        if not self.open_blocks:
            return False
        if self.num_verdicts == 0:
            return True
        return draft_ahead_pays(self.acceptance.value, len(self.open_blocks[-1].token_ids))

    def check_block_size(self, field: str, num_tokens: int, allow_zero: bool, sequence_len: int | None = None) -> None:
        """A block of `num_tokens` after the first `sequence_len` tokens (default: the whole sequence) fits."""
        low = 0 if allow_zero else 1
        if not low <= num_tokens <= self.limits.max_num_speculative_tokens:
            raise InvalidArgument(field, f"must be in [{low}, {self.limits.max_num_speculative_tokens}], got {num_tokens}")
        used = len(self.sequence.token_ids) if sequence_len is None else sequence_len
        if num_tokens > 0 and num_tokens > self.limits.max_context_tokens - used:
            raise FailedPrecondition(
                f"{field}: {num_tokens} draft tokens do not fit the draft model's context "
                f"({self.limits.max_context_tokens} tokens, {used} used)"
            )


class _BlockDrafting:
    """One block's drafting on the model worker: a token per forward pass, each pass shared with other sessions'
    tokens, the next token's forward queued at once (`Continue`) without a trip through the event loop."""

    def __init__(self, session: DraftSession, num_tokens: int, ahead: bool):
        self.session = session
        self.num_tokens = num_tokens
        self.ahead = ahead
        self.guessing = ahead  # the first forward of a block drafted ahead guesses the target's next token
        self.start_position = len(session.sequence.token_ids)
        self.token_ids: list[int] = []
        self.draft_probs: list[SparseDistribution] = []

    def row(self) -> ForwardRow:
        sequence = self.session.sequence
        return ForwardRow(sequence, sequence.uncached_token_ids(), logits_to_keep=1)

    def step(self, logits: torch.Tensor) -> "_BlockDrafting | Continue | None":
        """After one forward: the finished drafting (self), the next forward, or None when abandoned."""
        session = self.session
        if self.guessing:
            session.ahead_guess = session.choose_next_token(None, logits)
            self.guessing = False
            self.start_position = len(session.sequence.token_ids)
        else:
            self.token_ids.append(session.choose_next_token(self.draft_probs, logits))
        if len(self.token_ids) == self.num_tokens:
            return self
        # The event loop sets pending_verdict when the verdict on the open block arrives meanwhile.
        verdict = session.pending_verdict
        if self.ahead and verdict is not None and not session.keeps_ahead_block(verdict):
            return None
        return Continue(self.row(), self.step)


class DraftEngine:
    def __init__(self, runner, vocabulary: Vocabulary, limits: DraftLimits, metrics: DraftMetrics | None = None,
                 max_batch_size: int = 64, max_batch_tokens: int = 4096):
        """`runner`: a kv_pool.BatchedCausalLMRunner (sessions share forward passes) or a kv_cache.CausalLMRunner."""
        self.runner = runner
        self.metrics = metrics or DraftMetrics(CollectorRegistry())
        self.vocabulary = vocabulary
        self.limits = limits
        self.sessions: dict[int, DraftSession] = {}
        self._session_ids = itertools.count(1)
        self.batcher = ForwardBatcher(runner, max_batch_size, max_batch_tokens, self.metrics.batches.record_batch,
                                      thread_name="draft-model")
        self.metrics.batches.watch(runner)

    @property
    def live_sessions(self) -> int:
        return len(self.sessions)

    def _validate_start(self, start: SessionStart) -> None:
        if not start.prompt_token_ids:
            raise InvalidArgument("start.prompt_token_ids", "must not be empty")
        vocab_size = self.vocabulary.vocab_size
        bad = [t for t in start.prompt_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgument("start.prompt_token_ids", f"ids must be in [0, {vocab_size}), got {bad[:5]}")
        start.sampling.validate()
        mismatch = self.vocabulary.mismatch(start.target_vocabulary)
        if mismatch:
            raise FailedPrecondition(f"draft vocabulary differs from the target's: {mismatch}")
        if len(self.sessions) >= self.limits.max_sessions:
            raise ResourceExhausted(f"draft server is at its limit of {self.limits.max_sessions} sessions")

    def _drafted(self, block: CandidateBlock | None) -> CandidateBlock | None:
        if block is not None:
            self.metrics.record_block(len(block.token_ids), block.draft_ns / 1e9)
        return block

    async def start_session(self, start: SessionStart) -> tuple[DraftSession, CandidateBlock]:
        """Open a session and draft its first block."""
        self._validate_start(start)
        session = DraftSession(next(self._session_ids), start, self.runner.new_sequence(start.prompt_token_ids),
                               self.limits, self.runner.device)
        self.sessions[session.session_id] = session  # it holds a KV slot from here on
        try:
            session.check_block_size("start.num_speculative_tokens", start.num_speculative_tokens, allow_zero=False)
            log.info("session %d open (request %s, %d prompt tokens)", session.session_id, start.request_id,
                     len(start.prompt_token_ids), extra={"request_id": start.request_id})
            return session, self._drafted(await session.draft_block(self.batcher, start.num_speculative_tokens))
        except BaseException:
            self.close_session(session)  # the caller never gets the session to close
            raise

    async def step(self, session: DraftSession, verdict: Verdict) -> CandidateBlock | None:
        """Apply a verdict; draft the next block when the verdict asks for one and no block drafted ahead stands.
        The session has no forward in flight: the block drafted ahead, if any, was awaited first."""
        ahead_stands = session.apply_verdict(verdict, self.vocabulary.vocab_size)
        if verdict.num_speculative_tokens == 0 or ahead_stands:
            return None
        return self._drafted(await session.draft_block(self.batcher, verdict.num_speculative_tokens))

    async def draft_ahead(self, session: DraftSession, num_tokens: int) -> CandidateBlock | None:
        """Draft the block after the newest open one, on the guess that it is fully accepted (None if abandoned)."""
        if not session.drafting_ahead_pays():
            return None
        if len(session.sequence.token_ids) + num_tokens + 1 > self.limits.max_context_tokens:
            return None
        return self._drafted(await session.draft_block(self.batcher, num_tokens, ahead=True))

    def close_session(self, session: DraftSession) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.batcher.release(session.sequence)
            log.info("session %d closed after %d blocks", session.session_id, session.next_block_index,
                     extra={"request_id": session.request_id})

    def shutdown(self) -> None:
        self.batcher.shutdown()
