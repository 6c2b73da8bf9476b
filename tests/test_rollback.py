"""Both halves' real code paths, in one process without the network: after every verdict the KV caches hold
exactly the entries the protocol says, and the two sequences agree."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from draft_server.engine import DraftEngine, DraftLimits
from splitspec import models
from splitspec.kv_cache import CausalLMRunner
from splitspec.kv_pool import BatchedCausalLMRunner
from splitspec.protocol import SessionStart, Verdict
from splitspec.sampling import SamplingParams, make_generator
from target_server.engine import finish_verification, verification_row


def verify_block(target, sequence, block, sampling, generator):
    """One round of the target's own code path, unbatched. Its logits, from the cache rolled back after every
    round before, must be those of one forward over the whole sequence without a cache: a cache that kept a
    rejected token's entry, or lost an accepted one, gives other logits even where its length looks right."""
    row = verification_row(sequence, block)
    logits = target.forward(sequence, row.token_ids, row.logits_to_keep)  # [k+1, vocab]
    with torch.inference_mode():
        fresh = target.model(input_ids=torch.tensor([sequence.token_ids + block.token_ids])).logits[0]
    torch.testing.assert_close(logits, fresh[-row.logits_to_keep :].float(), rtol=1e-4, atol=1e-4)
    return finish_verification(sequence, block, sampling, generator, logits)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


PROMPT = [1, 17, 99, 230, 41]


def _start_both_halves(model_dirs, draft_name, sampling, k, draft_ahead, runner_class=BatchedCausalLMRunner):
    """Both halves' real session objects, in this process: the draft's first block and the target's prefilled
    sequence, on runners of `runner_class` (pooled, or a DynamicCache per sequence as for models that cannot
    batch)."""
    target = runner_class(_load(model_dirs["target"]))
    draft_model = _load(model_dirs[draft_name])
    vocabulary = models.vocabulary_of(draft_model, None)
    engine = DraftEngine(runner_class(draft_model), vocabulary,
                         DraftLimits(max_num_speculative_tokens=8, max_context_tokens=512, max_draft_support=64,
                                     max_sessions=4))
    start = SessionStart(PROMPT, sampling, k, vocabulary, "rollback-test", draft_ahead)
    session, block = asyncio.run(engine.start_session(start))
    sequence = target.new_sequence(PROMPT)
    target.prefill(sequence, len(PROMPT) - 1)
    return target, engine, vocabulary, session, block, sequence


@pytest.mark.parametrize("draft_name,sampling", [
    ("unrelated_draft", SamplingParams()),
    ("target", SamplingParams()),
    ("related_draft", SamplingParams()),
    ("related_draft", SamplingParams(temperature=1.0, top_k=20, seed=7)),
])
@pytest.mark.parametrize("runner_class", [BatchedCausalLMRunner, CausalLMRunner])
def test_caches_match_rollback_to_after_every_verdict(model_dirs, draft_name, sampling, runner_class):
    k = 4
    target, engine, vocabulary, session, block, sequence = _start_both_halves(model_dirs, draft_name, sampling, k,
                                                                               draft_ahead=False,
                                                                               runner_class=runner_class)
    generator = make_generator(sampling.seed)
    accepted_lens = []
    for _ in range(12):
        assert block.start_position == len(sequence.token_ids)
        verification = verify_block(target, sequence, block, sampling, generator)
        rollback_to = block.start_position + verification.accepted_len
        accepted_lens.append(verification.accepted_len)
        # Target: every sequence token but the last is cached, nothing past the accepted prefix.
        assert sequence.cached_len == rollback_to == len(sequence.token_ids) - 1
        session.apply_verdict(Verdict(block.block_index, verification.accepted_len, verification.next_token_id,
                                      rollback_to, k), vocabulary.vocab_size)
        # Draft: cropped to rollback_to; after a fully accepted block its last draft token was never fed.
        assert session.sequence.cached_len == min(rollback_to, block.start_position + k - 1)
        assert session.sequence.token_ids == sequence.token_ids
        block = asyncio.run(session.draft_block(engine.batcher, k))
    if draft_name == "target" and sampling.greedy:
        assert accepted_lens == [k] * 12
    else:
        assert min(accepted_lens) < k  # rejections happened and were rolled back
    engine.close_session(session)
    assert engine.live_sessions == 0


@pytest.mark.parametrize("draft_name,sampling", [
    ("target", SamplingParams()),
    ("related_draft", SamplingParams()),
    ("related_draft", SamplingParams(temperature=1.0, top_k=20, seed=3)),
])
def test_draft_ahead_keeps_both_halves_in_step(model_dirs, draft_name, sampling):
    """The draft drafts each next block before the verdict; a block drafted ahead is used exactly when the verdict
    confirms its guess, and otherwise the draft rolls back as without draft-ahead."""
    k = 3
    target, engine, vocabulary, session, block, sequence = _start_both_halves(model_dirs, draft_name, sampling, k,
                                                                               draft_ahead=True)
    generator = make_generator(sampling.seed)
    used_ahead = 0
    for _ in range(12):
        ahead = asyncio.run(session.draft_block(engine.batcher, k, ahead=True))
        assert ahead.start_position == block.start_position + k + 1 and ahead.drafted_ahead
        verification = verify_block(target, sequence, block, sampling, generator)
        rollback_to = block.start_position + verification.accepted_len
        verdict = Verdict(block.block_index, verification.accepted_len, verification.next_token_id, rollback_to, k)
        guess_right = verification.accepted_len == k and verification.next_token_id == ahead.preceding_token_id
        assert session.apply_verdict(verdict, vocabulary.vocab_size) == guess_right
        if guess_right:
            used_ahead += 1
            # The draft's sequence already continues with the block drafted ahead, which the target uses next.
            assert session.sequence.token_ids == sequence.token_ids + ahead.token_ids
            block = ahead
        else:
            assert session.sequence.token_ids == sequence.token_ids
            assert session.sequence.cached_len <= rollback_to
            block = asyncio.run(session.draft_block(engine.batcher, k))
        assert (block.start_position, block.preceding_token_id) == (len(sequence.token_ids), sequence.token_ids[-1])
        assert sequence.cached_len == len(sequence.token_ids) - 1
    # The self-draft covers the guess-right branch, the related draft the rollback branch.
    assert used_ahead == 12 if draft_name == "target" else used_ahead < 12


def test_a_refused_session_start_gives_its_kv_slot_back(model_dirs):
    from splitspec.errors import FailedPrecondition, InvalidArgument

    draft_model = _load(model_dirs["unrelated_draft"])
    vocabulary = models.vocabulary_of(draft_model, None)
    runner = BatchedCausalLMRunner(draft_model)
    engine = DraftEngine(runner, vocabulary, DraftLimits(max_num_speculative_tokens=8, max_context_tokens=64,
                                                         max_draft_support=64, max_sessions=4))
    try:
        for k, prompt, error in [(9, PROMPT, InvalidArgument), (4, PROMPT * 12 + [1, 2], FailedPrecondition)]:
            with pytest.raises(error):
                asyncio.run(engine.start_session(SessionStart(prompt, SamplingParams(), k, vocabulary, "refused")))
        assert (engine.live_sessions, runner.pool.slots_in_use) == (0, 0)
        session, _ = asyncio.run(engine.start_session(SessionStart(PROMPT, SamplingParams(), 4, vocabulary, "ok")))
        assert session.sequence.slot == 0  # the refused starts' slots were reused
        engine.close_session(session)
        assert runner.pool.slots_in_use == 0
    finally:
        engine.shutdown()
