"""Speculative sampling through both real servers follows the target model's distribution."""

import collections

import torch
from scipy import stats
from splitspec_client import Client

from splitspec.sampling import SamplingParams, logits_to_probs

PROMPT = "Beautiful is better than"
SAMPLING = dict(temperature=1.0, top_k=6)
DRAWS = 400


def test_first_sampled_token_follows_the_target_distribution(target_related, reference):
    # With max_new_tokens=2 each request verifies one draft token: the first output token is the accepted draft
    # token or the recovered one, so its distribution tests the whole accept/reject path across both processes.
    input_ids = torch.tensor([reference.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        logits = reference.model(input_ids).logits[0, -1]
    p = logits_to_probs(logits, SamplingParams(**SAMPLING))
    support = torch.nonzero(p > 0).squeeze(-1).tolist()
    counts = collections.Counter()
    accepted = drafted = 0
    with Client(target_related.address, timeout=60) as client:
        for seed in range(DRAWS):
            result = client.generate(PROMPT, max_new_tokens=2, num_speculative_tokens=1, seed=seed, ignore_eos=True,
                                     **SAMPLING)
            counts[result.token_ids[0]] += 1
            accepted += result.stats.num_accepted_tokens
            drafted += result.stats.num_draft_tokens
    assert set(counts) <= set(support)
    observed = [counts[t] for t in support]
    expected = [float(p[t]) * DRAWS for t in support]
    assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)
    assert drafted == DRAWS and 0 < accepted < DRAWS  # the draft was used, and it was sometimes rejected


def test_a_tiny_temperature_samples_instead_of_failing(target_related, reference):
    """1e-40 is a valid temperature (finite, > 0): it samples at 0.01, nearly greedily, on both halves."""
    with Client(target_related.address, timeout=60) as client:
        result = client.generate(PROMPT, max_new_tokens=16, ignore_eos=True, temperature=1e-40, seed=3)
    assert len(result.token_ids) == 16 and not result.stats.fallback_reason and result.stats.num_drafts > 0
