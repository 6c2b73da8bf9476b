"""Block-size policy: adaptive per session, bounded by tokens left and by load."""

import pytest
from splitspec_client import Client

from servers import start_target
from target_server.speculation import BlockSizer, load_cap


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
