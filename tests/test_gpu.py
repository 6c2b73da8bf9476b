"""The split as deployed: the target on the GPU, the draft on the CPU (`make test-gpu`; marker gpu, skipped where
there is no CUDA device). Outputs must equal the target alone, token for token, with sessions batched together.

The equality tests run the target in float32, as the reference does: greedy equality is a property of the numbers.
Two more check bfloat16, the production dtype, where batching may change logits by rounding (docs/architecture.md
§6): pooled batches stay within it, and a bf16 target serves speculative sessions.
"""

import random
import time
import warnings

import pytest
import torch
from splitspec_client import Client

from scrape import METRICS_FLAGS, scrape
from servers import start_draft, start_target
from splitspec import LLM, SamplingParams
from splitspec import sampling as token_sampling
from splitspec.kv_cache import CausalLMRunner, ForwardRow, Sequence
from splitspec.kv_pool import BatchedCausalLMRunner
from splitspec.protocol import CandidateBlock, SparseDistribution
from splitspec.speculative import Verification
from target_server.engine import finish_verification
from test_batching import PROMPTS, _at_once, _mean_batch, extend_both, sequence_pairs
from tiny_models import build_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_draft(model_dirs, log_dir):
    draft = start_draft(model_dirs["related_draft"], log_dir, "gpu-draft", *METRICS_FLAGS)
    yield draft
    assert draft.stop() == 0, draft.log()


@pytest.fixture(scope="module")
def gpu_target(model_dirs, log_dir, gpu_draft):
    target = start_target(model_dirs["target"], log_dir, "gpu-target", [gpu_draft.address], "--device", "cuda",
                          *METRICS_FLAGS)
    yield target
    assert target.stop() == 0, target.log()


@pytest.fixture(scope="module")
def cuda_reference(reference):
    """The target alone on the GPU, in float32 (HF generate)."""
    model = reference.model.to("cuda")
    tokenizer = reference.tokenizer

    def greedy(prompt: str, max_new_tokens: int) -> list[int]:
        input_ids = torch.tensor([tokenizer.encode(prompt)], device="cuda")
        with torch.no_grad():
            output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
        return output[0, input_ids.shape[1]:].tolist()

    yield greedy
    reference.model.to("cpu")


def test_the_target_reports_the_gpu(gpu_target):
    with Client(gpu_target.address, timeout=60) as client:
        info = client.info()
    assert info.device.startswith("cuda") and info.dtype == "float32"


def test_eight_sessions_verified_on_the_gpu_equal_the_target_alone(gpu_target, cuda_reference):
    before = scrape(gpu_target)
    results = _at_once(gpu_target.address, PROMPTS, max_new_tokens=40, num_speculative_tokens=3)
    for prompt, token_ids in zip(PROMPTS, results):
        assert token_ids == cuda_reference(prompt, 40), prompt
    assert _mean_batch(gpu_target, before, "splitspec:batch_size") > 1.5


def test_seeded_sampling_on_the_gpu_is_the_same_batched_or_alone(gpu_target):
    params = dict(max_new_tokens=24, num_speculative_tokens=3, temperature=0.9, top_k=50, seed=11)
    alone = [_at_once(gpu_target.address, [prompt], **params)[0] for prompt in PROMPTS[:4]]
    assert _at_once(gpu_target.address, PROMPTS[:4], **params) == alone


def test_offline_llm_with_the_target_on_the_gpu(model_dirs, cuda_reference):
    with LLM(model=model_dirs["target"], speculative_model=model_dirs["related_draft"], num_speculative_tokens=3,
             device="cuda", dtype="float32") as llm:
        outputs = llm.generate(PROMPTS[:3], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for prompt, output in zip(PROMPTS[:3], outputs):
        assert list(output.outputs[0].token_ids) == cuda_reference(prompt, 24), prompt


def test_pooled_batches_in_bfloat16_on_the_gpu_stay_close_to_one_cache_per_sequence():
    """The production dtype: batching changes bf16 logits by rounding only (docs/architecture.md §6)."""
    model = build_llama(seed=0).to("cuda", torch.bfloat16)
    alone, batched = CausalLMRunner(model), BatchedCausalLMRunner(model)
    rng = random.Random(0)
    pairs = sequence_pairs(alone, batched, rng)
    agree = total = 0
    for _ in range(10):
        rows, expected = [], []
        for reference, pooled in pairs:
            extend_both(reference, pooled, rng, 5)
            fed = reference.uncached_token_ids()
            expected.append(alone.forward(reference, fed, len(fed)))
            rows.append(ForwardRow(pooled, fed, len(fed)))
        for want, got in zip(expected, batched.forward_batch(rows)):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            total += got.shape[0]
    assert agree / total > 0.9, (agree, total)


def test_a_bfloat16_target_on_the_gpu_serves_speculative_sessions(model_dirs, log_dir, gpu_draft):
    target = start_target(model_dirs["target"], log_dir, "gpu-bf16-target", [gpu_draft.address], "--device", "cuda",
                          "--dtype", "bfloat16")
    try:
        results = _at_once(target.address, PROMPTS, max_new_tokens=24, num_speculative_tokens=3)
        assert [len(token_ids) for token_ids in results] == [24] * len(PROMPTS)
        with Client(target.address, timeout=60) as client:
            result = client.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True, num_speculative_tokens=3)
            assert client.info().dtype == "bfloat16"
        assert result.stats.num_drafts > 0 and not result.stats.fallback_reason
    finally:
        assert target.stop() == 0, target.log()


def test_the_goodput_schedule_on_the_gpu_keeps_the_targets_output(model_dirs, log_dir, gpu_draft, cuda_reference):
    """Its start-up profile times forwards on the GPU (synchronized); block sizes follow, output does not change."""
    target = start_target(model_dirs["target"], log_dir, "gpu-goodput-target", [gpu_draft.address], "--device",
                          "cuda", "--num-speculative-tokens-schedule", "goodput")
    try:
        results = _at_once(target.address, PROMPTS, max_new_tokens=40, num_speculative_tokens=4)
        for prompt, token_ids in zip(PROMPTS, results):
            assert token_ids == cuda_reference(prompt, 40), prompt
        assert "target forward by tokens fed (goodput schedule)" in target.log()
    finally:
        assert target.stop() == 0, target.log()


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "one-cache-per-sequence"])
def test_a_forward_on_the_gpu_returns_once_the_gpu_has_run_it(pooled):
    """The batcher times forward_batch for verify_ns (and the goodput schedule learns from it): a forward whose GPU
    work is still queued when it returns is timed as its launch. A forward made to queue ~0.1 s of GPU spinning
    first must take that long."""
    model = build_llama(seed=0).to("cuda")
    runner = BatchedCausalLMRunner(model) if pooled else CausalLMRunner(model)
    runner.forward_batch([ForwardRow(runner.new_sequence([5]), [5], 1)])  # warm-up (kernels, allocator)
    forward = model.forward
    cycles_per_s = torch.cuda.get_device_properties(0).clock_rate * 1000  # clock_rate is in kHz

    def forward_after_spinning(*args, **kwargs):
        torch.cuda._sleep(int(0.1 * cycles_per_s))  # queued on the stream: the host does not wait for it here
        return forward(*args, **kwargs)

    model.forward = forward_after_spinning
    started = time.perf_counter()
    runner.forward_batch([ForwardRow(runner.new_sequence([5, 6, 7]), [5, 6, 7], 1)])
    assert time.perf_counter() - started >= 0.08


class _UncachedSequence(Sequence):
    cached_len = 0

    def truncate_cache(self, length: int) -> None:
        pass


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_rounds_verification_reads_from_the_gpu_as_often_whatever_its_block_size(temperature):
    """finish_verification runs on the model worker for each session of a batch, one after another; every read from
    the GPU waits for it. Greedy reads the block's argmax once; sampling a fixed few times, not per draft token (it
    checked and copied each draft token's q on the device). Counted with torch's sync debug mode."""
    sampling = token_sampling.SamplingParams(temperature=temperature)

    def syncs(k: int) -> int:
        # The target puts nearly all mass on token 0, the draft little: every draft token 0 is accepted.
        logits = torch.full((k + 1, 64), -20.0, device="cuda")
        logits[:, 0] = 20.0
        q = SparseDistribution(torch.tensor([0, 1]), torch.tensor([0.01, 0.99]))
        block = CandidateBlock(0, 1, [0] * k, [q] * k if temperature else [], 0, 0)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                verification = finish_verification(_UncachedSequence([7]), block, sampling,
                                                   token_sampling.make_generator(0, "cuda"), logits)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert verification == Verification(k, 0)
        return sum("synchroniz" in str(warning.message) for warning in caught)

    counts = [syncs(k) for k in (1, 8)]
    assert counts[0] == counts[1] and counts[0] <= (1 if sampling.greedy else 4), counts
