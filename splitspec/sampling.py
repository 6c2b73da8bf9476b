"""Logits to next-token probabilities: the one sampling implementation shared by the draft and the target.

Both halves must turn logits into probabilities identically, otherwise the target's accept/reject test compares
a draft distribution q that the draft never sampled from. The transform copies Hugging Face transformers'
TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (min_tokens_to_keep=1), in that order, so a
splitspec request with given SamplingParams draws from the same distribution as `generate(do_sample=True)`.

The draft sends its distribution q over the wire as a sparse distribution (the most likely `max_support` tokens,
renormalized); it samples its draft token from exactly that sparse q, so the target's q is the draft's q.
"""

import math
import secrets
from dataclasses import dataclass

import torch

from splitspec.errors import InvalidArgument


# Temperatures in (0, MIN_TEMPERATURE) sample at MIN_TEMPERATURE (vLLM's _MAX_TEMP clamp): logits divided by
# a tinier one overflow float32 to inf, and the softmax of infs is NaN.
MIN_TEMPERATURE = 0.01


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; mirrors `splitspec.v1.SamplingParams`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument("sampling.temperature", f"must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument("sampling.top_k", f"must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if math.isnan(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidArgument("sampling.seed", f"must be in [0, 2**64), got {self.seed}")


def logits_to_probs(
    logits: torch.Tensor,  # [..., vocab_size], any float dtype
    params: SamplingParams,
) -> torch.Tensor:  # [..., vocab_size] float32
    """Temperature, then top-k, then top-p, then softmax: exactly the Hugging Face warpers in that order."""
    if params.greedy:
        raise ValueError("logits_to_probs needs temperature > 0; greedy decoding takes the argmax of the logits")
    # generate() casts logits to float32 before the warpers; doing the same makes a bf16 draft and an fp16 target
    # agree on the filtering thresholds.
    scores = logits.float() / max(params.temperature, MIN_TEMPERATURE)

    if params.top_k > 0:
        top_k = min(params.top_k, scores.size(-1))
        # Ties with the k-th score are kept, as in TopKLogitsWarper.
        kth_score = torch.topk(scores, top_k)[0][..., -1:]  # [..., 1]
        scores = scores.masked_fill(scores < kth_score, -math.inf)

    if params.top_p < 1.0:
        sorted_scores, sorted_ids = torch.sort(scores, descending=False)  # [..., vocab_size] each
        cumulative_probs = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop the least likely tokens whose mass together stays within 1 - top_p; always keep the most likely.
        sorted_remove = cumulative_probs <= (1 - params.top_p)
        sorted_remove[..., -1:] = False
        remove = sorted_remove.scatter(-1, sorted_ids, sorted_remove)
        scores = scores.masked_fill(remove, -math.inf)

    return scores.softmax(dim=-1)


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for one request; without a seed, one from the OS so concurrent requests never share a stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def sample(
    probs: torch.Tensor,  # [vocab_size], on the generator's device
    generator: torch.Generator,
) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sparse_distribution(
    probs: torch.Tensor,  # [vocab_size] float32
    max_support: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # token_ids [m] int64, probs [m] float32, m <= max_support
    """The non-zero entries of `probs`, most likely first; beyond `max_support` the tail is cut and the rest
    renormalized. The caller must sample from the result (`sample_sparse`), not from `probs`."""
    if max_support < 1:
        raise ValueError(f"max_support must be >= 1, got {max_support}")
    token_ids = torch.nonzero(probs > 0).squeeze(-1)  # [n]
    kept_probs, order = torch.sort(probs[token_ids].float(), descending=True, stable=True)  # [n] each
    token_ids = token_ids[order]
    if token_ids.numel() > max_support:
        token_ids = token_ids[:max_support]
        kept_probs = kept_probs[:max_support]
        kept_probs = kept_probs / kept_probs.sum()
    return token_ids, kept_probs


def sample_sparse(
    token_ids: torch.Tensor,  # [m] int64
    probs: torch.Tensor,  # [m] float32
    generator: torch.Generator,
) -> int:
    return int(token_ids[torch.multinomial(probs, 1, generator=generator)].item())


def densify_block(
    token_ids: list[torch.Tensor],  # k of [m_i] int64, one per draft token
    probs: list[torch.Tensor],  # k of [m_i] float32
    vocab_size: int,
    device: str | torch.device,
) -> torch.Tensor:  # [k, vocab_size] float32 on `device`
    """Inverse of `sparse_distribution` for a block's k distributions: the target rebuilds the draft's q over the whole
    vocabulary, stacked on `device`. They come off the wire on the host and are checked there: checked on a GPU, each
    would cost two reads from it (a wait for everything queued), per draft token and session, on the model worker's
    thread; instead the ids and the probabilities cross over once each."""
    if len(token_ids) != len(probs) or any(ids.shape != ps.shape or ids.dim() != 1
                                           for ids, ps in zip(token_ids, probs)):
        raise ValueError(f"token_ids {[tuple(t.shape) for t in token_ids]} and probs {[tuple(p.shape) for p in probs]} "
                         "must be equal 1-D shapes")
    dense = torch.zeros((len(token_ids), vocab_size), dtype=torch.float32, device=device)
    if not token_ids or not sum(ids.numel() for ids in token_ids):
        return dense
    flat_ids = torch.cat([ids.long() for ids in token_ids])  # [m]
    if not (0 <= int(flat_ids.min()) and int(flat_ids.max()) < vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size})")
    rows = torch.repeat_interleave(torch.arange(len(token_ids), device=flat_ids.device),
                                   torch.tensor([ids.numel() for ids in token_ids], device=flat_ids.device),
                                   output_size=flat_ids.numel())  # [m]
    # non_blocking towards a device only (to the host it would let the host read before the copy lands): a copy from
    # the host's ordinary memory is staged at once, and the device's stream orders the rest.
    non_blocking = dense.device.type != "cpu"
    cells = torch.stack([rows, flat_ids]).to(device, non_blocking=non_blocking)  # [2, m]
    dense[cells[0], cells[1]] = torch.cat([ps.float() for ps in probs]).to(device, non_blocking=non_blocking)
    return dense
