"""Batched forward passes over many sequences whose KV caches share one pool, a slot per sequence.

The target verifies the blocks of many sessions in one forward pass (vLLM's and TGI's continuous batching); its
sequences cannot each keep a `DynamicCache`, because stacking them per pass would copy every cache. Instead (as
gpt-fast's static cache, without vLLM's paging):

  pool      - per layer, keys and values are one tensor `# [slots, kv_heads, capacity, head_dim]`, grown by doubling
              when a forward needs more slots or positions. A sequence owns one slot and a cached length.
  rollback  - rewinds the cached length. Entries past it are stale but never read: each query attends only to keys
              at or before its own position, and a forward writes the positions from the cached length onward
              before any query attends.
  a forward - takes rows of different sequences, each feeding some tokens after its own cached prefix. Rows are
              left-padded to the longest, so that every row's last `logits_to_keep` logits are the batch's last
              ones; explicit position ids and a 4D attention mask give each row its own positions and prefix.
              Padding columns store no KV entries (no query reads them) and their outputs are dropped; so the pool
              never grows past the longest row's last real position, however long the batch's longest row.

Only models whose every layer attends to the full causal prefix, through "sdpa" or "eager" attention, can take a
4D mask this way (`batching_problem` says why another cannot); sliding-window and hybrid layers would need a mask
of their own. A model family might also ignore the explicit positions or the mask: `runner_for` tries a small ragged
batch against unbatched forwards at start-up and falls back to one cache per sequence when they differ or fail.
"""

import dataclasses
import heapq

import torch
from transformers import Cache

from splitspec.kv_cache import CausalLMRunner, ForwardRow, Runner, Sequence, wait_for_device

BATCHABLE_ATTENTION = ("sdpa", "eager")


def batching_problem(model: torch.nn.Module) -> str | None:
    """Why `model` cannot run batched forward passes over the pool (None: it can)."""
    config = model.config
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in BATCHABLE_ATTENTION:
        return f"attention implementation {attention!r} takes no 4D mask (batching needs one of {BATCHABLE_ATTENTION})"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    layer_types = getattr(config, "layer_types", None) or []
    if any(layer_type != "full_attention" for layer_type in layer_types):
        return f"layer types other than full attention ({sorted(set(layer_types))})"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    return None


class KVPool:
    """Keys and values of many sequences, one slot each, for every layer of one model."""

    def __init__(self, num_layers: int, initial_slots: int = 4, initial_capacity: int = 256):
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each [slots, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._initial_sizes = (initial_slots, initial_capacity)
        self._num_slots, self._capacity = self._initial_sizes
        self._free_slots: list[int] = []
        self._slots_handed_out = 0

    @property
    def slots_in_use(self) -> int:
        return self._slots_handed_out - len(self._free_slots)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values if t is not None)

    def acquire(self) -> int:
        """A slot for a new sequence, the lowest free one (the pool stays compact); its storage is grown, if need
        be, by the first forward that writes it."""
        if self._free_slots:
            return heapq.heappop(self._free_slots)
        self._slots_handed_out += 1
        return self._slots_handed_out - 1

    def release(self, slot: int) -> None:
        """Give a slot back. Safe even while a forward that writes it waits or runs (a request cancelled meanwhile):
        forwards run one at a time, and the slot's next owner feeds its tokens from position 0, each forward
        writing its positions before attending to them, so what the old forward leaves is never read."""
        heapq.heappush(self._free_slots, slot)

    def free_if_unused(self) -> None:
        """Drop the storage when no slot is in use, so that a burst of sessions does not hold its memory for good;
        the next forward allocates again. Only while no forward runs."""
        if self.slots_in_use == 0:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers
            self._num_slots, self._capacity = self._initial_sizes

    def write_and_gather(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
                         batch: "PoolBatch") -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys and values `# [rows, kv_heads, columns, head_dim]` of the real (not padding)
        columns at their positions; return the rows' keys and values `# [rows, kv_heads, kv_length, head_dim]`."""
        self._reserve(layer_idx, key_states, batch.max_slot + 1, batch.kv_length)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # Advanced indices around a slice put their dims first: both sides are [real cells, kv_heads, head_dim].
        keys[batch.write_slots, :, batch.write_positions] = (
            key_states[batch.write_rows, :, batch.write_columns].to(keys.dtype))
        values[batch.write_slots, :, batch.write_positions] = (
            value_states[batch.write_rows, :, batch.write_columns].to(values.dtype))
        return (keys[:, :, : batch.kv_length].index_select(0, batch.slots),
                values[:, :, : batch.kv_length].index_select(0, batch.slots))

    def _reserve(self, layer_idx: int, like: torch.Tensor, num_slots: int, length: int) -> None:
        current = self.keys[layer_idx]
        if current is not None and current.shape[0] >= num_slots and current.shape[2] >= length:
            return
        self._num_slots = max(self._num_slots, _doubled_to(self._num_slots, num_slots))
        self._capacity = max(self._capacity, _doubled_to(self._capacity, length))
        _, kv_heads, _, head_dim = like.shape
        for store in (self.keys, self.values):
            grown = like.new_zeros((self._num_slots, kv_heads, self._capacity, head_dim))
            if store[layer_idx] is not None:
                old = store[layer_idx]
                grown[: old.shape[0], :, : old.shape[2]] = old
            store[layer_idx] = grown


def _doubled_to(current: int, needed: int) -> int:
    size = max(1, current)
    while size < needed:
        size *= 2
    return size


@dataclasses.dataclass
class PoolBatch:
    """Where one batched forward writes and what it reads: row r is slot `slots[r]`; real cell i (a fed token, not
    padding) is column `write_columns[i]` of row `write_rows[i]`, stored at `write_positions[i]` of `write_slots[i]`."""

    slots: torch.Tensor  # [rows]
    write_rows: torch.Tensor  # [real cells]
    write_columns: torch.Tensor  # [real cells]
    write_slots: torch.Tensor  # [real cells]
    write_positions: torch.Tensor  # [real cells]
    kv_length: int
    max_slot: int
    min_cached_len: int


class _PoolCache(Cache):
    """The `Cache` a model sees during one batched forward: every layer's update goes to the pool."""

    def __init__(self, pool: KVPool, batch: PoolBatch):
        super().__init__(layers=[])
        self.pool = pool
        self.batch = batch

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.pool.write_and_gather(layer_idx, key_states, value_states, self.batch)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The shortest row's cached length. Rows differ, so a model may use this only where explicit position ids
        and the 4D mask override it (OPT reads it to derive positions it then takes from position_ids); `runner_for`
        checks at start-up that a model's batched rows equal its unbatched ones."""
        return self.batch.min_cached_len


class PooledSequence(Sequence):
    """A sequence whose KV entries (of its first `cached_len` tokens) live in one slot of a KVPool."""

    def __init__(self, pool: KVPool, token_ids: list[int]):
        super().__init__(token_ids)
        self.pool = pool
        self.cached_len = 0
        self.slot = pool.acquire()

    def truncate_cache(self, length: int) -> None:
        self.cached_len = min(self.cached_len, length)

    def release(self) -> None:
        """Give the slot back (idempotent). A forward already batched may still write it (see KVPool.release);
        the batcher takes no new one."""
        if not self.released:
            super().release()
            self.pool.release(self.slot)


class BatchedCausalLMRunner(Runner):
    """Runs forward passes over many `PooledSequence`s at once."""

    def __init__(self, model: torch.nn.Module, pool: KVPool | None = None):
        problem = batching_problem(model)
        if problem:
            raise ValueError(f"cannot batch {type(model).__name__}: {problem}")
        self.model = model
        self.device = next(model.parameters()).device
        self.pool = pool or KVPool(model.config.num_hidden_layers)
        self._additive_mask = model.config._attn_implementation == "eager"

    def new_sequence(self, token_ids: list[int]) -> PooledSequence:
        return PooledSequence(self.pool, token_ids)

    @torch.inference_mode()
    def forward_batch(self, rows: list[ForwardRow]) -> list[torch.Tensor]:
        """One forward over every row; returns each row's float32 logits `# [logits_to_keep, vocab_size]`, whose
        row i predicts the token after fed token len(token_ids) - logits_to_keep + i. Each row's fed tokens count
        as cached afterwards, as with a `DynamicCache`: `truncate_cache` drops those that should not stay. Returns
        once the device has run the forward, as the batcher times it (`wait_for_device`)."""
        num_columns = max(len(row.token_ids) for row in rows)
        starts, padding, input_ids = [], [], []
        for row in rows:
            if not row.token_ids or not 1 <= row.logits_to_keep <= len(row.token_ids):
                raise ValueError("a row feeds at least one token and keeps 1 to all of its logits")
        if len({id(row.sequence) for row in rows}) != len(rows):
            raise ValueError("a sequence appears in two rows of one batch")
        for row in rows:
            starts.append(row.sequence.cached_len)
            padding.append(num_columns - len(row.token_ids))
            input_ids.append([0] * padding[-1] + row.token_ids)
        device = self.device
        columns = torch.arange(num_columns, device=device)  # [columns]
        start = torch.tensor(starts, device=device)[:, None]  # [rows, 1]
        pad = torch.tensor(padding, device=device)[:, None]  # [rows, 1]
        real = columns[None, :] >= pad  # [rows, columns]
        # A real column c of row r sits at position start + c - pad. Padding columns are stored nowhere and fed at
        # position 0: any other could lie past the model's learned positions (GPT-2's wpe).
        positions = torch.where(real, start + columns - pad, 0)  # [rows, columns]
        # Each row's last real token ends its keys. Not max(starts) + columns: a long cached row batched with a long
        # prefill would grow every slot of the pool past the model's context.
        kv_length = max(s + len(row.token_ids) for s, row in zip(starts, rows))
        keys = torch.arange(kv_length, device=device)  # [kv_length]
        # A real query attends to its row's keys up to its own position; a padding one only to key 0 (never empty).
        attend = torch.where(real[:, :, None], keys[None, None, :] <= positions[:, :, None],
                             keys[None, None, :] == 0)[:, None]  # [rows, 1, columns, kv_length]
        slot_ids = [row.sequence.slot for row in rows]
        slots = torch.tensor(slot_ids, device=device)  # [rows]
        # The real cells, listed on the host: their number is known without waiting for the device.
        cells = [(r, pad_r + i, slot_ids[r], starts[r] + i)
                 for r, pad_r in enumerate(padding) for i in range(num_columns - pad_r)]
        write_rows, write_columns, write_slots, write_positions = torch.tensor(cells, device=device).unbind(1)
        batch = PoolBatch(slots, write_rows, write_columns, write_slots, write_positions, kv_length, max(slot_ids),
                          min(starts))
        dtype = self.model.dtype
        mask = (torch.zeros(attend.shape, dtype=dtype, device=device).masked_fill(~attend, torch.finfo(dtype).min)
                if self._additive_mask else attend)
        output = self.model(input_ids=torch.tensor(input_ids, device=device), attention_mask=mask,
                            position_ids=positions, cache=_PoolCache(self.pool, batch), use_cache=True,
                            logits_to_keep=max(row.logits_to_keep for row in rows))
        for row in rows:
            row.sequence.cached_len += len(row.token_ids)
        logits = output.logits.float()  # [rows, max logits_to_keep, vocab]
        wait_for_device(device)
        return [logits[r, logits.shape[1] - row.logits_to_keep :] for r, row in enumerate(rows)]

    def free_unused_memory(self) -> None:
        self.pool.free_if_unused()

    def forward(self, sequence: PooledSequence, token_ids: list[int], logits_to_keep: int) -> torch.Tensor:
        """A batch of one row (`Runner.forward`'s contract)."""
        return self.forward_batch([ForwardRow(sequence, token_ids, logits_to_keep)])[0]


def batched_forward_problem(model: torch.nn.Module) -> str | None:
    """Why batched forwards over a pool do not give `model`'s own results (None: they do), found by trying: two
    sequences of different cached lengths, fed ragged rows twice, against one DynamicCache per sequence. A model
    family whose forward ignores explicit position ids or a 4D mask fails here, at start-up, not on a request."""
    vocab_size = model.config.vocab_size
    tokens = [t % vocab_size for t in range(11, 20)]
    # Two sequences with prompts of 5 and 1 tokens; then 1 and 3 more tokens: rows of different lengths, cached
    # prefixes and numbers of kept logits, padded both ways.
    prompts, extensions, kept = [tokens[:5], tokens[5:6]], [tokens[6:7], tokens[6:9]], [(2, 1), (1, 3)]
    alone = CausalLMRunner(model)
    batched = BatchedCausalLMRunner(model, KVPool(model.config.num_hidden_layers, initial_slots=2,
                                                  initial_capacity=8))
    pairs = [(alone.new_sequence(list(prompt)), batched.new_sequence(list(prompt))) for prompt in prompts]
    tolerance = 1e-3 if model.dtype == torch.float32 else 3e-2
    try:
        for step, keeps in enumerate(kept):
            if step:
                for (reference, pooled), extension in zip(pairs, extensions):
                    reference.token_ids += extension
                    pooled.token_ids += extension
            expected = [alone.forward(reference, reference.uncached_token_ids(), keep)
                        for (reference, _), keep in zip(pairs, keeps)]
            got = batched.forward_batch([ForwardRow(pooled, pooled.uncached_token_ids(), keep)
                                         for (_, pooled), keep in zip(pairs, keeps)])
            for want, row_logits in zip(expected, got):
                scale = float(want.abs().max()) or 1.0
                if row_logits.shape != want.shape or not torch.allclose(row_logits, want, rtol=tolerance,
                                                                         atol=tolerance * scale):
                    return "its batched forwards differ from its unbatched ones"
    except Exception as exc:  # any failure of the model's forward on a pooled batch rules batching out
        return f"a batched forward fails ({type(exc).__name__}: {exc})"
    return None


def runner_for(model: torch.nn.Module) -> tuple["BatchedCausalLMRunner | CausalLMRunner", str | None]:
    """A batched runner over a pool when the model allows one and its batched forwards check out; else one
    DynamicCache per sequence, and why."""
    problem = batching_problem(model) or batched_forward_problem(model)
    return (CausalLMRunner(model), problem) if problem else (BatchedCausalLMRunner(model), None)
