"""One sequence's token ids and KV cache, and the forward pass that extends them.

Both halves keep their own cache per session; it never crosses the wire. The invariant that makes rollback cheap:
the cache holds the KV entries of a prefix of `token_ids` (`cached_len` tokens). Rolling back to `rollback_to` only
drops entries past that point (`DynamicCache.crop`), and the next forward feeds whatever tokens are not cached yet.
"""

import dataclasses

import torch
from transformers import DynamicCache


class Sequence:
    """A sequence's token ids and a KV cache holding the entries of its first `cached_len` tokens; subclasses say where
    that cache lives (`SequenceKV`: its own DynamicCache; `kv_pool.PooledSequence`: a slot of a shared pool)."""

    cached_len: int

    def __init__(self, token_ids: list[int]):
        self.token_ids = list(token_ids)
        self.released = False

    def uncached_token_ids(self) -> list[int]:
        return self.token_ids[self.cached_len :]

    def truncate_cache(self, length: int) -> None:
        """Keep the KV entries of the first `length` tokens (fewer stay as they are)."""
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Drop tokens (and their KV entries) past `length`."""
        del self.token_ids[length:]
        self.truncate_cache(length)

    def release(self) -> None:
        """The sequence runs no more forwards (idempotent)."""
        self.released = True


class SequenceKV(Sequence):
    """A sequence with its own DynamicCache, freed with it."""

    def __init__(self, token_ids: list[int], config):
        super().__init__(token_ids)
        self.cache = DynamicCache(config=config)

    @property
    def cached_len(self) -> int:
        return self.cache.get_seq_length()

    def truncate_cache(self, length: int) -> None:
        excess = self.cached_len - length
        if excess > 0:
            # transformers 5.x: crop() takes the number of tokens to remove, as a negative count.
            self.cache.crop(-excess)


def wait_for_device(device: torch.device) -> None:
    """Return once `device` has run the work queued on it. CUDA kernels run asynchronously: a forward returns as soon
    as it is queued, so a clock read then times the launch alone and the work lands in whatever waits on the device
    next (the next batch's forward, which the goodput schedule would then take for slow). A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class ForwardRow:
    """One row of a batched forward: feed `token_ids` after the sequence's cached prefix, keep the last
    `logits_to_keep` rows of logits."""

    sequence: Sequence  # of the kind its runner makes
    token_ids: list[int]
    logits_to_keep: int


class Runner:
    """Forward passes of one Hugging Face causal LM over the sequences it makes (`new_sequence`)."""

    def forward(self, sequence: Sequence, token_ids: list[int], logits_to_keep: int) -> torch.Tensor:
        """Feed `token_ids` after the cached prefix; returns float32 logits `# [logits_to_keep, vocab_size]`, whose
        row i predicts the token after fed token len(token_ids) - logits_to_keep + i."""
        raise NotImplementedError

    def prefill(self, sequence: Sequence, upto: int) -> None:
        """Cache the KV entries of the first `upto` tokens (no logits needed)."""
        missing = sequence.token_ids[sequence.cached_len : upto]
        if missing:
            self.forward(sequence, missing, logits_to_keep=1)


class CausalLMRunner(Runner):
    """Runs forward passes over `SequenceKV`s, one sequence at a time."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device

    def new_sequence(self, token_ids: list[int]) -> SequenceKV:
        return SequenceKV(token_ids, self.model.config)

    @torch.inference_mode()
    def forward(self, sequence: SequenceKV, token_ids: list[int], logits_to_keep: int) -> torch.Tensor:
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
        output = self.model(input_ids=input_ids, cache=sequence.cache, use_cache=True, logits_to_keep=logits_to_keep)
        return output.logits[0].float()  # [logits_to_keep, vocab_size]

    def forward_batch(self, rows: list[ForwardRow]) -> list[torch.Tensor]:
        """`forward` of each row, one after another: a DynamicCache per sequence cannot join a batch. Returns once
        the device has run them, as the batcher times it (`wait_for_device`)."""
        logits = [self.forward(row.sequence, row.token_ids, row.logits_to_keep) for row in rows]
        wait_for_device(self.device)
        return logits

    def free_unused_memory(self) -> None:
        """Nothing to free: each sequence's cache goes with it."""
