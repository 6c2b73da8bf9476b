"""Conversions between the splitspec.v1 messages both servers share and the domain types.

Server-specific messages are converted in each server's `wire` module; engine and model code never see protobufs.
"""


import torch
from splitspec_client.v1 import common_pb2, draft_pb2

from splitspec.models import Vocabulary
from splitspec.protocol import CandidateBlock, SessionStart, SparseDistribution, Verdict
from splitspec.sampling import SamplingParams


def sampling_from_pb(message: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=message.temperature,
        top_k=message.top_k,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        seed=message.seed if message.HasField("seed") else None,
    )


def sampling_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    message = common_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        message.seed = params.seed
    return message


def vocabulary_from_pb(message: common_pb2.VocabularyInfo) -> Vocabulary:
    return Vocabulary(
        vocab_size=message.vocab_size,
        eos_token_ids=tuple(message.eos_token_ids),
        bos_token_id=message.bos_token_id,
        pad_token_id=message.pad_token_id,
        tokenizer_fingerprint=message.tokenizer_fingerprint,
    )


def vocabulary_to_pb(vocabulary: Vocabulary) -> common_pb2.VocabularyInfo:
    return common_pb2.VocabularyInfo(
        vocab_size=vocabulary.vocab_size,
        eos_token_ids=list(vocabulary.eos_token_ids),
        bos_token_id=vocabulary.bos_token_id,
        pad_token_id=vocabulary.pad_token_id,
        tokenizer_fingerprint=vocabulary.tokenizer_fingerprint,
    )


def session_start_from_pb(message: draft_pb2.SessionStart) -> SessionStart:
    return SessionStart(
        prompt_token_ids=list(message.prompt_token_ids),
        sampling=sampling_from_pb(message.sampling),
        num_speculative_tokens=message.num_speculative_tokens,
        target_vocabulary=vocabulary_from_pb(message.target_vocabulary),
        request_id=message.request_id,
        draft_ahead=message.draft_ahead,
    )


def session_start_to_pb(start: SessionStart) -> draft_pb2.SessionStart:
    return draft_pb2.SessionStart(
        prompt_token_ids=start.prompt_token_ids,
        sampling=sampling_to_pb(start.sampling),
        num_speculative_tokens=start.num_speculative_tokens,
        target_vocabulary=vocabulary_to_pb(start.target_vocabulary),
        request_id=start.request_id,
        draft_ahead=start.draft_ahead,
    )


def verdict_from_pb(message: draft_pb2.Verdict) -> Verdict:
    return Verdict(
        block_index=message.block_index,
        accepted_len=message.accepted_len,
        next_token_id=message.next_token_id,
        rollback_to=message.rollback_to,
        num_speculative_tokens=message.num_speculative_tokens,
        num_verified_tokens=message.num_verified_tokens or None,
    )


def verdict_to_pb(verdict: Verdict) -> draft_pb2.Verdict:
    return draft_pb2.Verdict(
        block_index=verdict.block_index,
        accepted_len=verdict.accepted_len,
        next_token_id=verdict.next_token_id,
        rollback_to=verdict.rollback_to,
        num_speculative_tokens=verdict.num_speculative_tokens,
        num_verified_tokens=verdict.num_verified_tokens or 0,
    )


def block_to_pb(block: CandidateBlock) -> draft_pb2.CandidateBlock:
    return draft_pb2.CandidateBlock(
        block_index=block.block_index,
        start_position=block.start_position,
        token_ids=block.token_ids,
        draft_probs=[
            draft_pb2.SparseDistribution(token_ids=q.token_ids.tolist(), probs=q.probs.tolist())
            for q in block.draft_probs
        ],
        draft_ns=block.draft_ns,
        preceding_token_id=block.preceding_token_id,
        drafted_ahead=block.drafted_ahead,
    )


def block_from_pb(message: draft_pb2.CandidateBlock) -> CandidateBlock:
    """Decodes a block without judging it: the target validates what a draft server sent before using it."""
    return CandidateBlock(
        block_index=message.block_index,
        start_position=message.start_position,
        token_ids=list(message.token_ids),
        draft_probs=[
            SparseDistribution(
                token_ids=torch.tensor(list(q.token_ids), dtype=torch.long),
                probs=torch.tensor(list(q.probs), dtype=torch.float32),
            )
            for q in message.draft_probs
        ],
        draft_ns=message.draft_ns,
        preceding_token_id=message.preceding_token_id,
        drafted_ahead=message.drafted_ahead,
    )
