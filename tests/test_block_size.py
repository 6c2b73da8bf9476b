"""Block-size schedules (constant, heuristic, goodput) per session, bounded by tokens left and by load."""

import pytest
import torch
from splitspec_client import Client

from scrape import METRICS_FLAGS, metric, scrape
from servers import start_draft, start_target
from target_server.block_size import (
    SCHEDULES,
    BlockSizer,
    GoodputPrior,
    GoodputSizer,
    VerifyProfile,
    load_cap,
    make_sizer,
    measure_verify_profile,
    profile_lengths,
)
from target_server.cli import build_parser


def test_fixed_block_size_ignores_acceptance():
    sizer = BlockSizer(max_tokens=4, adaptive=False)
    sizer.record(4, 0)
    assert sizer.next_size(tokens_left=100, load_cap=4) == 4


def test_adaptive_block_size_follows_acceptance():
    sizer = BlockSizer(max_tokens=6, adaptive=True)
    sizer.record(6, 2)
    sizer.record(5, 0)
    assert sizer.next_size(100, 6) == 4
    sizer.record(4, 4)
    assert sizer.next_size(100, 6) == 6  # +2 after a fully accepted block, capped at the request's k
    for _ in range(10):
        sizer.record(1, 0)
    assert sizer.next_size(100, 6) == 1  # never below one draft token


@pytest.mark.parametrize("tokens_left,expected", [(100, 4), (5, 4), (4, 3), (2, 1), (1, 0)])
def test_block_never_drafts_past_max_new_tokens(tokens_left, expected):
    assert BlockSizer(4, adaptive=False).next_size(tokens_left, load_cap=4) == expected


@pytest.mark.parametrize("running,expected", [(1, 8), (8, 8), (9, 4), (16, 4), (17, 0)])
def test_speculation_backs_off_under_load(running, expected):
    assert load_cap(8, running, backoff_running=16) == expected
    assert load_cap(8, running, backoff_running=0) == 8


def test_adaptive_and_backoff_stay_lossless(model_dirs, log_dir, reference, unrelated_draft):
    import concurrent.futures

    target = start_target(model_dirs["target"], log_dir, "target-adaptive", [unrelated_draft.address],
                          "--adaptive-num-speculative-tokens", "--speculation-backoff-running", "4")
    prompts = [f"The quick brown fox {i}" for i in range(4)]
    try:
        def run(prompt):
            with Client(target.address, timeout=120) as client:
                return client.generate(prompt, max_new_tokens=40, ignore_eos=True, num_speculative_tokens=6)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, prompts))
        for prompt, result in zip(prompts, results):
            assert list(result.token_ids) == reference(prompt, 40)
        # A low-acceptance draft shrinks its blocks: fewer draft tokens per block than the fixed 6.
        drafted = sum(r.stats.num_draft_tokens for r in results)
        drafts = sum(r.stats.num_drafts for r in results)
        assert drafts and drafted / drafts < 6
    finally:
        assert target.stop() == 0


def test_a_draft_with_a_smaller_block_limit_drafts_capped_blocks(model_dirs, log_dir, reference):
    """The target allows blocks of 16, its draft 2: a request for 6 speculates with blocks of 2 (it used to find no
    draft that fits and decode alone; a verdict asking for more than 2 would have failed the draft)."""
    draft = start_draft(model_dirs["target"], log_dir, "draft-max-2", "--max-num-speculative-tokens", "2")
    target = start_target(model_dirs["target"], log_dir, "target-over-draft-max", [draft.address])
    try:
        with Client(target.address, timeout=120) as client:
            result = client.generate("The quick brown fox", max_new_tokens=24, ignore_eos=True,
                                     num_speculative_tokens=6)
        assert list(result.token_ids) == reference("The quick brown fox", 24)
        assert not result.stats.fallback_reason and result.stats.num_drafts > 1
        assert result.stats.num_draft_tokens == 2 * result.stats.num_drafts
    finally:
        assert target.stop() == 0
        assert draft.stop() == 0


MS = 1_000_000
GPU_LIKE = VerifyProfile([1, 17], [20 * MS, 21 * MS])  # a forward costs about the same for 1 or 17 tokens
CPU_LIKE = VerifyProfile([1, 2, 5, 9], [26 * MS, 37 * MS, 40 * MS, 48 * MS])  # the demo target on one CPU core


def calibrated(max_tokens: int, profile: VerifyProfile) -> GoodputSizer:
    """A session on a server that has timed a target-only step (as profiled)."""
    return GoodputSizer(max_tokens, profile, GoodputPrior(plain_scale=1.0))


def feed(sizer: GoodputSizer, accepted_lens: list[int], k: int, profile: VerifyProfile, draft_ms: float = 1.0,
         overhead_ms: float = 1.0) -> list[int]:
    """Blocks of k with these accepted lengths, each followed by its round's timing as the profile predicts; returns
    the size asked after each verdict."""
    asked = []
    for accepted_len in accepted_lens:
        verify_ns = int(profile.ns(k + 1))
        draft_ns = int(k * draft_ms * MS)
        sizer.record(k, accepted_len, verify_ns, draft_ns / k)
        asked.append(sizer.next_size(tokens_left=1000, load_cap=k))
        sizer.record_round(k, verify_ns + draft_ns + int(overhead_ms * MS), verify_ns, draft_ns, timed=True)
    return asked


def plain_rounds(sizer: GoodputSizer, count: int, profile: VerifyProfile) -> list[int]:
    """Target-only rounds; returns the size asked after each."""
    asked = []
    for _ in range(count):
        verify_ns = int(profile.ns(1))
        sizer.record_round(0, verify_ns + MS // 10, verify_ns, 0, timed=True)
        asked.append(sizer.next_size(tokens_left=1000, load_cap=8))
    return asked


def test_schedule_choices_match_the_cli():
    assert tuple(build_parser()._option_string_actions["--num-speculative-tokens-schedule"].choices) == SCHEDULES
    assert isinstance(make_sizer("goodput", 4, GPU_LIKE), GoodputSizer)
    assert make_sizer("heuristic", 4, None).adaptive and not make_sizer("constant", 4, None).adaptive
    with pytest.raises(ValueError, match="VerifyProfile"):
        make_sizer("goodput", 4, None)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_sizer("fastest", 4, None)


def test_verify_profile_interpolates_and_never_decreases():
    profile = VerifyProfile([1, 3, 5], [10.0, 8.0, 14.0])  # 8 at 3 tokens is noise: it counts as 10
    assert [profile.ns(n) for n in (0, 1, 2, 3, 4, 5, 7)] == [10.0, 10.0, 10.0, 10.0, 12.0, 14.0, 18.0]
    assert VerifyProfile([1], [5.0]).ns(9) == 5.0
    with pytest.raises(ValueError):
        VerifyProfile([3, 1], [1.0, 2.0])
    assert profile_lengths(17) == [1, 2, 3, 5, 9, 17]
    assert profile_lengths(6) == [1, 2, 3, 5, 6]
    assert profile_lengths(1) == [1]


def test_verify_profile_measures_real_forwards(model_dirs):
    from splitspec import models
    from splitspec.kv_pool import runner_for

    runner, _ = runner_for(models.load_causal_lm(model_dirs["target"], torch.device("cpu"), torch.float32))
    profile = measure_verify_profile(runner, 9, context_tokens=16, repeats=2)
    assert profile.num_tokens == [1, 2, 3, 5, 9]
    assert all(ns > 0 for ns in profile.forward_ns) and profile.forward_ns == sorted(profile.forward_ns)
    assert runner.pool.slots_in_use == 0  # its throw-away sequence is released


def test_goodput_times_target_only_steps_before_a_servers_first_speculation():
    prior = GoodputPrior()
    sizer = GoodputSizer(4, CPU_LIKE, prior)
    assert sizer.next_size(100, 4) == 0
    sizer.record_round(0, 50 * MS, 30 * MS, 0, timed=False)  # the first round: its time includes the prefill
    assert sizer.next_size(100, 4) == 0
    assert plain_rounds(sizer, GoodputSizer.CALIBRATION_ROUNDS, CPU_LIKE) == [0] * (GoodputSizer.CALIBRATION_ROUNDS
                                                                                    - 1) + [4]
    assert prior.plain_scale == pytest.approx(1.0, rel=0.01)
    assert GoodputSizer(4, CPU_LIKE, prior).next_size(100, 4) == 4  # later sessions start at once


def test_goodput_drafts_the_full_block_until_it_has_measured_one():
    sizer = calibrated(6, CPU_LIKE)
    assert sizer.next_size(100, 6) == 6
    sizer.record(6, 0)  # a block without times
    assert sizer.next_size(100, 6) == 6
    # The first block's forward and drafting times are enough to plan, before any round is timed: here a draft
    # step costs a target step, and nothing was accepted: the shortest block, until the session's first
    # PROBE_BLOCKS blocks are in; then none.
    sizer.record(6, 0, verify_ns=int(CPU_LIKE.ns(7)), draft_ns_per_token=26 * MS)
    assert sizer.next_size(100, 6) == 1
    sizer.record(1, 0, verify_ns=int(CPU_LIKE.ns(2)), draft_ns_per_token=26 * MS)
    assert sizer.next_size(100, 6) == 0


def test_goodput_drafts_long_blocks_where_verifying_them_is_cheap():
    sizer = calibrated(8, GPU_LIKE)
    asked = feed(sizer, [8] * 3 + [7, 8, 8, 5, 8], 8, GPU_LIKE)
    assert asked[-1] == 8
    assert sizer.acceptance > 0.85


def test_goodput_drafts_shorter_blocks_where_each_verified_token_costs():
    # On the CPU-like target a block of 8 costs 48 of the 26 ms of a target-only step, drafting 3 ms a token: at
    # alpha ~0.7 the best block is short but speculation still pays.
    sizer = calibrated(8, CPU_LIKE)
    asked = feed(sizer, [3, 2, 4, 1, 3, 2, 8, 2, 3, 4], 8, CPU_LIKE, draft_ms=3.0)
    assert 1 <= asked[-1] <= 5
    round_costs = [sizer.round_ns(k) for k in range(9)]
    assert round_costs == sorted(round_costs)  # a longer block always costs more here


def test_goodput_counts_on_blocks_drafted_ahead_where_the_target_drafts_ahead():
    # A draft as slow as the demo-deep-draft pair's (10 ms a token beside a 26 ms target step), most blocks accepted
    # whole: drafting a block costs as much as verifying it, unless it is drafted ahead while the one before is
    # verified. Without drafting ahead the longest block is best; with it, the longest whose drafting the round
    # before can hide, 4 x 10 ms within 40 + 1 ms (a longer one is drafted ahead less often, and shows in part).
    sequential, pipelined = calibrated(8, CPU_LIKE), GoodputSizer(8, CPU_LIKE, GoodputPrior(plain_scale=1.0),
                                                                  draft_ahead=True)
    accepted = [8, 8, 4, 8, 8, 8, 6, 8, 8, 8]
    feed(sequential, accepted, 8, CPU_LIKE, draft_ms=10.0)
    feed(pipelined, accepted, 8, CPU_LIKE, draft_ms=10.0)
    assert sequential.overhead_ns == pipelined.overhead_ns == pytest.approx(MS, rel=0.01)
    assert pipelined.acceptance == sequential.acceptance > 0.95
    for k in range(1, 9):  # what drafting ahead hides, with chance alpha^(k+1)
        assert pipelined.round_ns(k) < sequential.round_ns(k)
    best = {name: max(range(1, 9), key=lambda k: sizer_goodput(sizer, k))
            for name, sizer in (("sequential", sequential), ("pipelined", pipelined))}
    assert best == {"sequential": 8, "pipelined": 4}, best
    # A round whose block was drafted ahead teaches no overhead: its drafting overlapped the round before.
    pipelined.record_round(8, 30 * MS, 28 * MS, 80 * MS, timed=True, drafted_ahead=True)
    assert pipelined.overhead_ns == pytest.approx(MS, rel=0.01)


def sizer_goodput(sizer: GoodputSizer, k: int) -> float:
    from splitspec.speculative import expected_tokens_per_round

    return expected_tokens_per_round(sizer.acceptance, k) / sizer.round_ns(k)


def test_goodput_switches_speculation_off_and_probes_back_with_growing_gaps():
    sizer = calibrated(4, CPU_LIKE)
    asked = feed(sizer, [0, 0, 0, 1, 0, 0], 4, CPU_LIKE, draft_ms=3.0)
    assert asked[-1] == 0 and sizer.switched_off == 1
    first_off = asked.index(0)
    assert set(asked[first_off:]) == {0}  # off stays off until the probe
    # One decision per verdict or target-only round, however often it is asked.
    assert {sizer.next_size(1000, 4) for _ in range(5)} == {0}
    after = plain_rounds(sizer, GoodputSizer.PROBE_AFTER, CPU_LIKE)
    assert after[:-1] == [0] * (GoodputSizer.PROBE_AFTER - 1) and after[-1] > 0  # the probe
    probe = feed(sizer, [0] * GoodputSizer.PROBE_BLOCKS, after[-1], CPU_LIKE, draft_ms=3.0)
    assert 0 not in probe[:-1] and probe[-1] == 0  # the probe lasts PROBE_BLOCKS blocks, and fails
    assert sizer.probe_after == 2 * GoodputSizer.PROBE_AFTER
    again = plain_rounds(sizer, 2 * GoodputSizer.PROBE_AFTER, CPU_LIKE)
    assert again.count(0) == 2 * GoodputSizer.PROBE_AFTER - 1 and again[-1] > 0


def test_goodput_stays_on_when_a_probe_finds_the_draft_agrees_again():
    sizer = calibrated(4, CPU_LIKE)
    feed(sizer, [0] * 6, 4, CPU_LIKE, draft_ms=3.0)
    assert plain_rounds(sizer, GoodputSizer.PROBE_AFTER, CPU_LIKE)[-1] > 0
    asked = feed(sizer, [4] * 8, 4, CPU_LIKE, draft_ms=3.0)  # every probe block accepted whole
    assert 0 not in asked and asked[-1] >= 2 and sizer.switched_off == 1
    assert sizer.probe_after == GoodputSizer.PROBE_AFTER


def test_goodput_sizes_a_sessions_first_block_from_the_sessions_before():
    prior = GoodputPrior(plain_scale=1.0)
    first = GoodputSizer(4, CPU_LIKE, prior)
    assert first.next_size(100, 4) == 4  # nothing known yet: the request's k
    feed(first, [0] * 6, 4, CPU_LIKE, draft_ms=3.0)
    first.finish()
    assert prior.acceptance == pytest.approx(first.acceptance)  # the first session replaces the default
    assert prior.draft_ns_per_token == pytest.approx(3 * MS, rel=0.01)
    assert prior.overhead_ns == pytest.approx(MS, rel=0.01)
    second = GoodputSizer(4, CPU_LIKE, prior)
    assert second.next_size(100, 4) == 0  # planned before its first block: the prior says it does not pay
    unused = GoodputSizer(4, CPU_LIKE, prior)
    unused.finish()  # a session that never drafted leaves the prior's acceptance alone
    assert prior.acceptance == pytest.approx(first.acceptance) and prior.sessions == 1
    for acceptance in (0.9, 0.9, 0.9, 0.9):
        prior.learn_acceptance(acceptance)  # a mean of the first sessions, then a moving average
    assert prior.acceptance == pytest.approx(0.9 - 0.7 * (0.9 - (first.acceptance + 2 * 0.9) / 3) * 0.7)
    # A prior from more sessions weighs more against a new session's first blocks (up to 4 x PRIOR_WEIGHT tokens).
    fifth = GoodputSizer(4, CPU_LIKE, prior)
    assert fifth.estimate.accepted + fifth.estimate.rejected == pytest.approx(4 * GoodputSizer.PRIOR_WEIGHT)
    assert fifth.acceptance == pytest.approx(prior.acceptance)
    prior.acceptance = 0.05  # where sessions found the draft useless, a new one starts on the target alone
    assert GoodputSizer(4, CPU_LIKE, prior).next_size(100, 4) == 0


def test_goodput_learns_what_a_target_only_step_costs_apart():
    """The profile's shape can err: target-only steps get a scale of their own once some were measured."""
    sizer = calibrated(4, CPU_LIKE)
    feed(sizer, [4] * 3, 4, CPU_LIKE)  # verify forwards exactly as profiled
    assert sizer.round_ns(0) == pytest.approx(CPU_LIKE.ns(1))
    verify_4 = sizer.round_ns(4)
    for _ in range(40):  # target-only steps 20% slower than profiled, 0.5 ms of bookkeeping each
        verify_ns = int(1.2 * CPU_LIKE.ns(1))
        sizer.record_round(0, verify_ns + MS // 2, verify_ns, 0, timed=True)
    assert sizer.round_ns(0) == pytest.approx(1.2 * CPU_LIKE.ns(1) + MS / 2, rel=1e-3)
    assert sizer.round_ns(4) == verify_4


def test_goodput_respects_tokens_left_and_load():
    sizer = calibrated(8, GPU_LIKE)
    feed(sizer, [8] * 4, 8, GPU_LIKE)
    assert sizer.next_size(tokens_left=3, load_cap=8) == 2
    assert sizer.next_size(tokens_left=100, load_cap=4) == 4
    assert sizer.next_size(tokens_left=100, load_cap=0) == 0
    assert calibrated(0, GPU_LIKE).next_size(100, 8) == 0


def test_goodput_schedule_switches_a_useless_draft_off_losslessly(model_dirs, log_dir, reference, unrelated_draft):
    """The unrelated draft is almost never right: the goodput schedule stops asking it for blocks after a few, probes
    it now and then, and the output stays the target's."""
    target = start_target(model_dirs["target"], log_dir, "target-goodput", [unrelated_draft.address],
                          "--num-speculative-tokens-schedule", "goodput", *METRICS_FLAGS)
    try:
        with Client(target.address, timeout=120) as client:
            result = client.generate("The quick brown fox", max_new_tokens=80, ignore_eos=True,
                                     num_speculative_tokens=4)
        assert list(result.token_ids) == reference("The quick brown fox", 80)
        stats = result.stats
        # A few blocks before it switches off, then probes of PROBE_BLOCKS blocks after 16 and 32 target-only
        # rounds: most rounds run on the target alone.
        assert 3 <= stats.num_drafts <= 16 and stats.rounds >= 60, (stats.num_drafts, stats.rounds)
        assert not stats.fallback_reason
        text = scrape(target)  # operators see it too
        assert metric(text, "splitspec:decode_rounds_total", kind="speculative") == stats.num_drafts
        assert metric(text, "splitspec:decode_rounds_total", kind="target_only") == stats.rounds - stats.num_drafts
        assert "goodput schedule" in target.log()  # the start-up profile, logged
    finally:
        assert target.stop() == 0


def test_a_session_asked_for_no_block_ends_its_draft_session_and_reopens_later(model_dirs, self_draft):
    """Between a verdict asking for k tokens and the next round, the load back-off or the schedule may say 0: the
    target decodes that round alone. The open draft session (drafting from a sequence that then grows) ends, and
    the next round that wants a block opens a fresh one instead of waiting on a block no verdict will answer."""
    import asyncio

    from splitspec import models
    from splitspec.sampling import SamplingParams
    from splitspec.speculative import Verification
    from target_server.draft_pool import DraftPool
    from target_server.request import GenerationRequest
    from target_server.speculation import Speculation

    model = models.load_causal_lm(model_dirs["target"], torch.device("cpu"), torch.float32)
    tokenizer = models.load_tokenizer(model_dirs["target"], required=True)
    vocabulary = models.vocabulary_of(model, tokenizer)

    async def scenario():
        pool = DraftPool([self_draft.address], vocabulary)
        await pool.start()
        try:
            request = GenerationRequest("reopen", tokenizer.encode("The quick brown fox"), SamplingParams(), 32, (),
                                        True, 3)
            speculation = Speculation(pool, request, vocabulary, timeout_s=5, max_reopens=0, draft_ahead=True)
            token_ids = list(request.prompt_token_ids)
            await speculation.open(token_ids, 3)
            block = await speculation.next_block(token_ids, 3)
            await speculation.send_verdict(block, Verification(3, 7), 3)  # asks for 3 more
            token_ids += block.token_ids + [7]
            assert await speculation.next_block(token_ids, 0) is None  # none this round after all
            assert speculation.link is None
            # Half-closed: counted until the draft, having freed the session, ends the call.
            for _ in range(500):
                if pool.endpoints[0].live_sessions == 0:
                    break
                await asyncio.sleep(0.01)
            assert pool.endpoints[0].live_sessions == 0
            token_ids.append(9)  # the target's own token of that round
            block = await speculation.next_block(token_ids, 2)
            assert block is not None and not speculation.fallback_reason
            assert (block.block_index, block.start_position, len(block.token_ids)) == (0, len(token_ids), 2)
            assert speculation.stale_blocks == 0
            await speculation.close(cancel=True)
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_cut_block_keeps_the_drafting_cost_of_every_token_drafted():
    from splitspec.protocol import CandidateBlock

    block = CandidateBlock(block_index=0, start_position=10, token_ids=[1, 2, 3, 4, 5, 6, 7, 8], draft_probs=[],
                           draft_ns=8000, preceding_token_id=0)
    assert block.draft_ns_per_token == 1000
    cut = block.truncated(5)
    assert cut.token_ids == [1, 2, 3, 4, 5] and cut.draft_ns == 8000 and cut.draft_ns_per_token == 1000
    assert cut.truncated(2).draft_ns_per_token == 1000


def test_a_verdict_on_a_cut_block_says_how_many_tokens_were_verified():
    """The target verified only the cut block's tokens; the draft's acceptance estimate must not read the tokens cut
    off as rejected (draft_server.engine.DraftSession.apply_verdict)."""
    import asyncio

    from splitspec.protocol import CandidateBlock
    from splitspec.sampling import SamplingParams
    from splitspec.speculative import Verification
    from target_server.request import GenerationRequest
    from target_server.speculation import Speculation

    class RecordingLink:
        def __init__(self):
            self.verdicts = []

        def block_size(self, num_tokens):
            return num_tokens

        async def send_verdict(self, verdict):
            self.verdicts.append(verdict)

    request = GenerationRequest("cut", [1, 2, 3], SamplingParams(), 32, (), True, 4)
    speculation = Speculation(pool=None, request=request, vocabulary=None, timeout_s=5, max_reopens=0,
                              draft_ahead=True)
    speculation.link = link = RecordingLink()
    block = CandidateBlock(block_index=0, start_position=3, token_ids=[5, 6, 7, 8], draft_probs=[], draft_ns=4000,
                           preceding_token_id=3)
    asyncio.run(speculation.send_verdict(block.truncated(2), Verification(2, 9), 2))
    asyncio.run(speculation.send_verdict(block, Verification(1, 9), 2))
    assert [(v.accepted_len, v.num_verified_tokens, v.rollback_to) for v in link.verdicts] == [(2, 2, 5), (1, 4, 4)]


def test_goodput_scales_the_profile_by_the_verify_forwards_it_measures():
    """A block of k is verified by a forward of k + 1 tokens (the target's last token and the k draft tokens): a
    machine twice as slow as profiled gives a scale of 2, whatever the profile's slope."""
    sizer = calibrated(4, CPU_LIKE)
    for _ in range(40):
        sizer.record(4, 2, int(2 * CPU_LIKE.ns(5)), MS)
    assert sizer.verify_scale == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("current, expected", [(2, 2), (1, 3)])
def test_goodput_keeps_its_block_size_unless_another_is_clearly_better(current, expected):
    """A new k must beat the current one by CHANGE_MARGIN (3%): k = 2 at 1% below the best stays, k = 1 at 7% below
    moves to the best."""
    from splitspec.speculative import expected_tokens_per_round

    sizer = calibrated(3, CPU_LIKE)
    feed(sizer, [2] * 3, 3, CPU_LIKE)
    goodput = {0: 1.0, 1: 1.40, 2: 1.485, 3: 1.50}  # tokens per unit of time
    sizer.round_ns = lambda k: expected_tokens_per_round(sizer.acceptance, k) / goodput[k]
    sizer.current, sizer._planned = current, None
    assert sizer.next_size(tokens_left=100, load_cap=3) == expected
