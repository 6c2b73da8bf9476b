"""How many draft tokens each block gets: the schedule of one session, and the load cap over all of them.

Schedules (`--num-speculative-tokens-schedule`, named after transformers' `num_assistant_tokens_schedule`):
  constant  - the request's num_speculative_tokens every round.
  heuristic - transformers' assisted-generation heuristic: +2 after a fully accepted block, -1 otherwise (>= 1).
  goodput   - the k in 0..num_speculative_tokens with the most expected tokens per second, from the session's
              acceptance and what its rounds cost (`GoodputSizer`); k = 0 switches speculation off for the session
              (its draft session ends) and probes bring it back.

Every schedule is bounded by the request's num_speculative_tokens, by the tokens left (a round yields at most k + 1
tokens, so a block never drafts past max_new_tokens) and by the server's load (`load_cap`).
"""

import bisect
import dataclasses
import time

import torch

from splitspec.kv_cache import Runner, wait_for_device
from splitspec.speculative import (DecayedAcceptance, chance_drafted_ahead_stands, draft_ahead_pays,
                                   expected_round_ns, goodput_by_block_size)


SCHEDULES = ("constant", "heuristic", "goodput")


class BlockSizer:
    """The constant and heuristic schedules."""

    def __init__(self, max_tokens: int, adaptive: bool):
        self.max_tokens = max_tokens
        self.adaptive = adaptive
        self.current = max_tokens

    def record(self, num_draft_tokens: int, accepted_len: int, verify_ns: int = 0,
               draft_ns_per_token: float = 0.0) -> None:
        """A block's verdict, before the next block's size is asked (with its forward's and its drafting's times)."""
        if self.adaptive and num_draft_tokens:
            step = 2 if accepted_len == num_draft_tokens else -1
            self.current = max(1, min(self.max_tokens, self.current + step))

    def record_round(self, num_draft_tokens: int, round_ns: int, verify_ns: int, draft_ns: int, timed: bool,
                     drafted_ahead: bool = False) -> None:
        """A round's timing, once it is over (unused here)."""

    def finish(self) -> None:
        """The session is over."""

    def next_size(self, tokens_left: int, load_cap: int) -> int:
        return max(0, min(self.current, tokens_left - 1, load_cap))


def load_cap(max_tokens: int, running: int, backoff_running: int) -> int:
    """Speculation backs off under load (vLLM measured 1.4-1.8x slowdowns at high QPS without it): full blocks up
    to half of `backoff_running` running requests, half-size blocks up to it, no speculation beyond."""
    if backoff_running <= 0 or running <= backoff_running // 2:
        return max_tokens
    if running <= backoff_running:
        return max_tokens // 2
    return 0


class VerifyProfile:
    """What one target forward costs by the number of tokens it feeds (1: a target-only step, k + 1: verifying a
    block of k), measured once at start-up at a few lengths and interpolated linearly between them."""

    def __init__(self, num_tokens: list[int], forward_ns: list[float]):
        if not num_tokens or len(num_tokens) != len(forward_ns) or num_tokens != sorted(set(num_tokens)):
            raise ValueError("a profile needs increasing token counts, one time each")
        self.num_tokens = list(num_tokens)
        # Feeding more tokens never costs less: timing noise must not make a longer block look cheaper.
        self.forward_ns = [max(forward_ns[: i + 1]) for i in range(len(forward_ns))]

    def ns(self, num_tokens: int) -> float:
        xs, ys = self.num_tokens, self.forward_ns
        if len(xs) == 1 or num_tokens <= xs[0]:
            return ys[0]
        i = min(max(bisect.bisect_left(xs, num_tokens), 1), len(xs) - 1)  # the segment xs[i-1]..xs[i], or the last
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + slope * (num_tokens - xs[i - 1])

    def describe(self) -> str:
        return ", ".join(f"{n}: {ns / 1e6:.2f} ms" for n, ns in zip(self.num_tokens, self.forward_ns))


def profile_lengths(max_num_tokens: int) -> list[int]:
    """1, 2, 3, 5, 9, 17, ... up to max_num_tokens, which is always included."""
    lengths, n = [1], 2
    while n < max_num_tokens:
        lengths.append(n)
        n = 2 * n - 1
    return sorted({*lengths, max(1, max_num_tokens)})


@torch.inference_mode()
def measure_verify_profile(runner: Runner, max_num_tokens: int, context_tokens: int = 64,
                           repeats: int = 5) -> VerifyProfile:
    """Time forwards of 1..max_num_tokens tokens after a `context_tokens` prefix (the fastest of `repeats` each:
    other work on the machine only ever adds), on a throw-away sequence of token id 0. Run before serving: it holds
    the model for 6 lengths x `repeats` forwards."""
    sequence = runner.new_sequence([0] * context_tokens)
    try:
        runner.prefill(sequence, context_tokens)
        lengths, times = profile_lengths(max_num_tokens), []
        for num_tokens in (lengths[-1], 1):  # warm-up
            runner.forward(sequence, [0] * num_tokens, num_tokens)
            sequence.truncate_cache(context_tokens)
        for num_tokens in lengths:
            samples = []
            for _ in range(repeats):
                wait_for_device(runner.device)
                started = time.perf_counter_ns()
                logits = runner.forward(sequence, [0] * num_tokens, num_tokens)
                logits.argmax(dim=-1).tolist()  # as a verification reads its result
                samples.append(time.perf_counter_ns() - started)
                sequence.truncate_cache(context_tokens)
            times.append(min(samples))
        return VerifyProfile(lengths, times)
    finally:
        sequence.release()


@dataclasses.dataclass
class GoodputPrior:
    """Where a new session's GoodputSizer starts, shared by the sessions of one server: the latest timing estimates
    (same draft servers, machine and load) and a running mean of the sessions' acceptance, so that even a session's
    first block is sized. Touched only from the event loop."""

    acceptance: float = 0.7
    draft_ns_per_token: float | None = None
    overhead_ns: float | None = None
    plain_overhead_ns: float = 0.0
    verify_scale: float = 1.0
    plain_scale: float | None = None
    sessions: int = 0  # finished sessions that drafted
    SESSION_WEIGHT = 0.3  # of a finished session's acceptance in the running mean, once there are a few

    def learn(self, sizer: "GoodputSizer") -> None:
        """A session's latest estimates (what it has not measured leaves the prior's as it is)."""
        if sizer.draft_ns_per_token is not None:
            self.draft_ns_per_token = sizer.draft_ns_per_token
        if sizer.overhead_ns is not None:
            self.overhead_ns = sizer.overhead_ns
        self.plain_overhead_ns, self.verify_scale = sizer.plain_overhead_ns, sizer.verify_scale
        if sizer.plain_samples >= sizer.CALIBRATION_ROUNDS or (sizer.plain_scale is not None and self.plain_scale):
            self.plain_scale = sizer.plain_scale

    def learn_acceptance(self, acceptance: float) -> None:
        """A plain mean of the first sessions' acceptance (the default counts for none), then a moving one."""
        self.sessions += 1
        self.acceptance += max(1 / self.sessions, self.SESSION_WEIGHT) * (acceptance - self.acceptance)


class GoodputSizer:
    """The goodput schedule: each block's k maximizes expected tokens per second, E(alpha, k) / round_ns(k).

    Its estimates, per session, starting from the server's `GoodputPrior`:
      acceptance     - per-token acceptance alpha: accepted draft tokens over accepted plus rejected ones (one
                       rejection per block not accepted whole), with old blocks decaying and the prior's acceptance
                       worth PRIOR_WEIGHT tokens (up to 4 x that, from a prior of several sessions).
      round_ns(k)    - verify(k + 1) + overhead + k x draft step for a block of k, less the drafting a block drafted
                       ahead hides (`expected_round_ns`: with chance alpha^(k+1) when the target has draft-ahead
                       on and the draft drafts ahead at that chance); verify(1) + target-only overhead for k = 0.
                       verify is the start-up `VerifyProfile` times the ratio the session's forwards
                       measured to it (which follows the machine's load and the batch the session shares), a ratio
                       of its own for target-only steps once there were some (the profile's shape errs); the draft
                       step is the draft's own measure per token; overhead is what a round costs beyond its verify
                       forward and its block's drafting, from rounds whose block was drafted after the verdict.
    A block's verify and drafting times count from the first block on; a round's overhead only from rounds that
    neither open a draft session (the draft's prefill) nor follow the target's prefill.

    When no k > 0 reaches SWITCH_OFF_MARGIN of target-only goodput, speculation stops for the session and its
    draft session ends; after `probe_after` target-only rounds (PROBE_AFTER, doubling up to MAX_PROBE_AFTER while
    probes keep failing) a probe of PROBE_BLOCKS blocks measures acceptance again (the session's acceptance so far
    counting as much as the prior then). A session's first PROBE_BLOCKS blocks are a probe too, unless the prior
    already says speculation does not pay. Until a target-only step has been timed on the server, a session begins
    with CALIBRATION_ROUNDS of them (after its first round, which is not timed).
    """

    PRIOR_WEIGHT = 2.0
    DECAY = 0.95  # per block: the last ~20 blocks carry most of the weight (faster, and noise turns speculation off)
    TIMING_WEIGHT = 0.2  # exponential moving average of timings
    SWITCH_OFF_MARGIN = 0.95
    # A new k must beat the current one by this much: each change costs the draft-ahead (a block drafted ahead at
    # the old k is cut, and a cut block is not accepted whole), and neighbouring k are often within noise.
    CHANGE_MARGIN = 1.03
    PROBE_AFTER = 16
    MAX_PROBE_AFTER = 256
    PROBE_BLOCKS = 3
    CALIBRATION_ROUNDS = 2  # timed target-only rounds a server's first sessions run before they speculate

    def __init__(self, max_tokens: int, profile: VerifyProfile, prior: GoodputPrior | None = None,
                 draft_ahead: bool = False):
        self.max_tokens = max_tokens
        self.profile = profile
        self.draft_ahead = draft_ahead
        self.prior = prior or GoodputPrior()
        # The prior weighs more once it is the mean of more sessions (up to 4 x PRIOR_WEIGHT).
        weight = self.PRIOR_WEIGHT * (1 + min(self.prior.sessions, 3))
        self.estimate = DecayedAcceptance.from_prior(self.prior.acceptance, weight, self.DECAY)
        self.verify_scale = self.prior.verify_scale
        self.plain_scale = self.prior.plain_scale
        self.draft_ns_per_token = self.prior.draft_ns_per_token
        self.overhead_ns = self.prior.overhead_ns
        self.plain_overhead_ns = self.prior.plain_overhead_ns
        self.num_blocks = 0
        self.plain_samples = 0  # timed target-only rounds
        # What a target-only step costs is measured, not inferred from the profile (whose shape errs by ~5%): until
        # some session has, a session starts with a few target-only rounds.
        self.calibrating = self.plain_scale is None
        self.speculating = max_tokens > 0
        self.plain_rounds = 0  # target-only rounds since speculation stopped
        self.probe_after = self.PROBE_AFTER
        self.blocks_left_in_probe = self.PROBE_BLOCKS  # a session speculates for a few blocks before it judges
        self.blocks_since_on = 0
        self.switched_off = 0  # times speculation stopped (for logs and tests)
        self.current = max_tokens  # the block size speculation last ran at
        self._planned: int | None = None

    @property
    def acceptance(self) -> float:
        return self.estimate.value

    def record(self, num_draft_tokens: int, accepted_len: int, verify_ns: int = 0,
               draft_ns_per_token: float = 0.0) -> None:
        """A block's verdict, with the time of its verify forward and the draft's time per token (its own measure):
        neither includes a prefill, so even a session's first block counts."""
        if not num_draft_tokens:
            return
        self.estimate.record(num_draft_tokens, accepted_len)
        self.blocks_left_in_probe = max(0, self.blocks_left_in_probe - 1)
        self.blocks_since_on += 1
        self.num_blocks += 1
        if verify_ns > 0 and draft_ns_per_token > 0:
            self.verify_scale = self._average(self.verify_scale, verify_ns / self.profile.ns(num_draft_tokens + 1))
            self.draft_ns_per_token = self._average(self.draft_ns_per_token, draft_ns_per_token)
            self.prior.learn(self)
        self._planned = None

    def record_round(self, num_draft_tokens: int, round_ns: int, verify_ns: int, draft_ns: int, timed: bool,
                     drafted_ahead: bool = False) -> None:
        """A round's time from verdict to verdict, once it is over; `timed` False for a round whose time includes a
        prefill or a draft session's opening."""
        if timed and num_draft_tokens and not drafted_ahead:
            self.overhead_ns = self._average(self.overhead_ns, round_ns - verify_ns - draft_ns)
        elif timed and verify_ns > 0:
            self.plain_scale = self._average(self.plain_scale, verify_ns / self.profile.ns(1))
            self.plain_overhead_ns = self._average(self.plain_overhead_ns, max(0, round_ns - verify_ns))
            self.plain_samples += 1
        if timed:
            self.prior.learn(self)
        if not num_draft_tokens and not self.speculating:
            self.plain_rounds += 1
        if not num_draft_tokens and (not self.speculating or self.calibrating):
            self._planned = None

    def finish(self) -> None:
        """The session is over: its acceptance joins the server's prior (if it drafted at all)."""
        if self.num_blocks:
            self.prior.learn_acceptance(self.acceptance)


    def _average(self, average: float | None, sample: float) -> float:
        return sample if average is None else average + self.TIMING_WEIGHT * (sample - average)

    def round_ns(self, k: int) -> float:
        if k == 0:
            scale = self.verify_scale if self.plain_scale is None else self.plain_scale
            return scale * self.profile.ns(1) + self.plain_overhead_ns
        verify_ns = self.verify_scale * self.profile.ns(k + 1)
        # With the chance the draft drafts at: it drafts ahead only where draft_ahead_pays.
        drafts_ahead = self.draft_ahead and draft_ahead_pays(self.acceptance, k)
        chance = chance_drafted_ahead_stands(self.acceptance, k) if drafts_ahead else 0.0
        # Before a round is timed, no overhead: the first plan errs towards speculating.
        return max(verify_ns, expected_round_ns(verify_ns, self.overhead_ns or 0.0, k * self.draft_ns_per_token,
                                                chance))

    def next_size(self, tokens_left: int, load_cap: int) -> int:
        """The next block's size; one decision per verdict (or target-only round), however often it is asked."""
        if self._planned is None:
            self._planned = self._plan()
            self.current = self._planned or self.current
        return max(0, min(self._planned, tokens_left - 1, load_cap))

    def _plan(self) -> int:
        if self.max_tokens == 0:
            return 0
        if self.calibrating:
            if self.plain_samples < self.CALIBRATION_ROUNDS and self.prior.plain_scale is None:
                return 0
            self.calibrating = False
            if self.plain_scale is None:  # another session measured it meanwhile
                self.plain_scale = self.prior.plain_scale
        if self.draft_ns_per_token is None:
            return self.max_tokens  # no block measured yet
        goodputs = goodput_by_block_size(self.acceptance, self.max_tokens, self.round_ns)
        best_k = max(range(1, self.max_tokens + 1), key=goodputs.__getitem__)
        if 0 < self.current <= self.max_tokens and goodputs[self.current] * self.CHANGE_MARGIN >= goodputs[best_k]:
            best_k = self.current
        if not self.speculating:
            if self.plain_rounds < self.probe_after:
                return 0
            self.speculating, self.blocks_left_in_probe, self.blocks_since_on = True, self.PROBE_BLOCKS, 0
            # The probe's blocks should count: the acceptance so far keeps its mean and the prior's weight only.
            self.estimate = DecayedAcceptance.from_prior(self.acceptance, self.PRIOR_WEIGHT, self.DECAY)
            return best_k
        judging = self.blocks_left_in_probe == 0 or self.num_blocks == 0  # a new session: on the prior alone
        if judging and goodputs[best_k] < self.SWITCH_OFF_MARGIN * goodputs[0]:
            # A probe that finds speculation still not paying waits twice as long for the next one.
            probed = self.blocks_since_on <= 2 * self.PROBE_BLOCKS and self.switched_off > 0
            self.probe_after = min(2 * self.probe_after, self.MAX_PROBE_AFTER) if probed else self.PROBE_AFTER
            self.speculating, self.plain_rounds = False, 0
            self.switched_off += 1
            return 0
        return best_k


def make_sizer(schedule: str, max_tokens: int, profile: VerifyProfile | None,
               prior: GoodputPrior | None = None, draft_ahead: bool = False) -> BlockSizer | GoodputSizer:
    if schedule == "goodput":
        if profile is None:
            raise ValueError("the goodput schedule needs the target's VerifyProfile")
        return GoodputSizer(max_tokens, profile, prior, draft_ahead)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    return BlockSizer(max_tokens, adaptive=schedule == "heuristic")
