"""Pure math: logits -> probabilities (against Hugging Face's warpers), validation, sparse distributions."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from splitspec.errors import InvalidArgument
from splitspec.sampling import (
    MIN_TEMPERATURE,
    SamplingParams,
    densify_block,
    logits_to_probs,
    make_generator,
    sample,
    sample_sparse,
    sparse_distribution,
)


def hf_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:  # logits [batch, vocab_size]
    # The warpers generate() builds for these parameters: top_k == 0 and top_p == 1.0 add none.
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k, min_tokens_to_keep=1))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p, min_tokens_to_keep=1))
    input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return warpers(input_ids, logits.float()).softmax(dim=-1)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.3, 50, 1.0),
        (1.0, 0, 0.9),
        (0.6, 20, 0.8),
        (2.0, 5, 0.5),
        (0.8, 1, 1.0),
        (1.0, 0, 1e-6),  # nucleus of one token
        (1.0, 0, 1e-8),  # 1 - top_p rounds to 1.0 in float32: the most likely token must still be kept
        (1.0, 10_000, 0.95),  # top_k above vocab_size
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_to_probs_matches_hugging_face_warpers(temperature, top_k, top_p, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(4, 1000) * 3).to(dtype)  # [batch, vocab_size]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)

    probs = logits_to_probs(logits, params)

    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    torch.testing.assert_close(probs, hf_probs(logits, params), rtol=0, atol=0)
    # Same values row by row: the target's [k+1, vocab] batch and the draft's single row agree.
    torch.testing.assert_close(logits_to_probs(logits[2], params), probs[2], rtol=0, atol=0)


def test_top_p_drops_the_tokens_whose_mass_is_exactly_one_minus_top_p():
    # Four equal logits: probabilities of exactly 0.25, cumulative 0.25 and 0.5 reach 1 - top_p = 0.5 exactly, and
    # the Hugging Face warper drops both (<=), keeping two tokens.
    logits = torch.zeros(1, 4)  # [batch, vocab_size]
    params = SamplingParams(temperature=1.0, top_p=0.5)
    probs = logits_to_probs(logits, params)
    assert int((probs > 0).sum()) == 2 and float(probs.max()) == 0.5
    torch.testing.assert_close(probs, hf_probs(logits, params), rtol=0, atol=0)


def test_logits_to_probs_filters_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])  # [vocab_size]
    assert torch.count_nonzero(logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))) == 2
    # softmax([4, 3, 2, 1, 0]) ~ [0.64, 0.24, 0.09, ...]: top_p = 0.85 needs the first two, 0.9 the first three.
    assert torch.count_nonzero(logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.85))) == 2
    assert torch.count_nonzero(logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.9))) == 3


def test_a_tiny_temperature_samples_at_the_minimum_instead_of_overflowing():
    logits = torch.tensor([[40.0, 39.0, -5.0], [3.0, 3.0, 1.0]])  # [2, vocab_size]
    at_minimum = logits_to_probs(logits, SamplingParams(temperature=MIN_TEMPERATURE))
    for temperature in (1e-40, 1e-30, 1e-3):
        probs = logits_to_probs(logits, SamplingParams(temperature=temperature))
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs, at_minimum, rtol=0, atol=0)
    torch.testing.assert_close(at_minimum[1], torch.tensor([0.5, 0.5, 0.0]))  # ties keep their mass, no NaN


def test_logits_to_probs_refuses_greedy():
    with pytest.raises(ValueError, match="temperature > 0"):
        logits_to_probs(torch.zeros(5), SamplingParams())


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(temperature=-0.1), "sampling.temperature"),
        (SamplingParams(temperature=math.nan), "sampling.temperature"),
        (SamplingParams(temperature=math.inf), "sampling.temperature"),
        (SamplingParams(top_k=-1), "sampling.top_k"),
        (SamplingParams(top_p=0.0), "sampling.top_p"),
        (SamplingParams(top_p=1.01), "sampling.top_p"),
        (SamplingParams(top_p=-0.5), "sampling.top_p"),
        (SamplingParams(top_p=math.nan), "sampling.top_p"),
        (SamplingParams(seed=-1), "sampling.seed"),
        (SamplingParams(seed=2**64), "sampling.seed"),
    ],
)
def test_validate_names_the_bad_field(params, field):
    with pytest.raises(InvalidArgument) as raised:
        params.validate()
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(temperature=0.7, top_k=40, top_p=0.95, seed=2**64 - 1), SamplingParams(top_p=1)],
)
def test_validate_accepts_good_params(params):
    params.validate()
    assert params.greedy == (params.temperature == 0)


def test_make_generator_is_reproducible_with_a_seed_and_random_without():
    draws = [torch.rand(8, generator=make_generator(seed)) for seed in (7, 7, None, None)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[2], draws[3])


def test_sample_returns_only_tokens_with_probability():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5])  # [vocab_size]
    generator = make_generator(0)
    assert {sample(probs, generator) for _ in range(200)} == {1, 3}


def test_sparse_distribution_densify_round_trip():
    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])  # [vocab_size]

    token_ids, sparse_probs = sparse_distribution(probs, max_support=10)

    assert token_ids.dtype == torch.int64 and sparse_probs.dtype == torch.float32
    assert token_ids.tolist() == [3, 4, 1]  # most likely first
    assert torch.equal(densify_block([token_ids], [sparse_probs], 6, "cpu")[0], probs)


def test_sparse_distribution_truncates_to_the_most_likely_and_renormalizes():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(100) * 2, dim=-1)  # [vocab_size]

    token_ids, sparse_probs = sparse_distribution(probs, max_support=10)

    assert set(token_ids.tolist()) == set(torch.topk(probs, 10).indices.tolist())
    assert torch.all(sparse_probs[:-1] >= sparse_probs[1:])
    assert sparse_probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Renormalizing keeps the ratios between the kept tokens.
    torch.testing.assert_close(sparse_probs / sparse_probs[0], probs[token_ids] / probs[token_ids[0]])


def test_sample_sparse_returns_only_kept_ids_in_proportion():
    probs = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.2])  # [vocab_size]
    token_ids, sparse_probs = sparse_distribution(probs, max_support=3)  # keeps 1, 3, 4
    generator = make_generator(3)

    drawn = torch.tensor([sample_sparse(token_ids, sparse_probs, generator) for _ in range(3000)])

    assert set(drawn.unique().tolist()) == {1, 3, 4}
    # 0.4 / 0.9 of the draws, within ~5 standard deviations.
    assert (drawn == 1).float().mean().item() == pytest.approx(0.4 / 0.9, abs=0.05)


def test_densify_block_writes_the_blocks_q_on_the_targets_device_without_reading_it():
    """The target's q for a block: row i is draft token i's distribution over the vocabulary, checked on the host
    where it came off the wire. The meta device holds no data, so any read from it raises: a GPU target's device is
    written, never read (each read would wait for all it has queued, per draft token and session). tests/test_gpu.py
    counts the reads of a whole verification."""
    token_ids = [torch.tensor([3, 1]), torch.tensor([0]), torch.tensor([5, 2, 4])]
    probs = [torch.tensor([0.75, 0.25]), torch.tensor([1.0]), torch.tensor([0.5, 0.3, 0.2])]
    dense = densify_block(token_ids, probs, 6, "cpu")
    assert torch.equal(dense, torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0],
                                            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                                            [0.0, 0.0, 0.3, 0.0, 0.2, 0.5]]))
    on_meta = densify_block(token_ids, probs, 6, "meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (3, 6)
    assert densify_block([], [], 6, "meta").shape == (0, 6)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        densify_block(token_ids, probs, 5, "meta")
    with pytest.raises(ValueError, match="shapes"):
        densify_block(token_ids, probs[:2], 6, "meta")


def test_densify_block_refuses_out_of_range_ids_and_unequal_shapes():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        densify_block([torch.tensor([1, 4])], [torch.tensor([0.5, 0.5])], 4, "cpu")
    with pytest.raises(ValueError, match="shapes"):
        densify_block([torch.tensor([1, 2])], [torch.tensor([1.0])], 4, "cpu")
