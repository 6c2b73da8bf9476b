"""Loading Hugging Face causal LMs and describing their vocabulary.

Both halves load through `from_pretrained`, so a local directory and a hub id work alike (this project's machines
reach no hub: tests save tiny models to a temporary directory and load them back through this path).
"""

import dataclasses
import hashlib
import logging
import os

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vLLM's other spellings, for the Python API (`LLM(dtype="half")`); the command lines offer DTYPES only.
DTYPE_ALIASES = {"half": torch.float16, "float": torch.float32}

# Where configs keep their context length, as vLLM reads it (_get_and_verify_max_len): OPT and most, GPT-2, MPT,
# ChatGLM, Command-R, others. Several may be present; the smallest holds.
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                       "max_sequence_length", "max_seq_length", "seq_len")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What a token id means to a model: equal vocabularies are required for a draft to serve a target."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int  # -1 when the model has none
    pad_token_id: int  # -1 when the model has none
    tokenizer_fingerprint: str  # empty when no tokenizer was loaded

    def mismatch(self, other: "Vocabulary") -> str | None:
        """Why `other` cannot stand in for this vocabulary, or None when it can."""
        problems = []
        if self.vocab_size != other.vocab_size:
            problems.append(f"vocab_size {other.vocab_size} != {self.vocab_size}")
        if set(self.eos_token_ids) != set(other.eos_token_ids):
            problems.append(f"eos_token_ids {sorted(other.eos_token_ids)} != {sorted(self.eos_token_ids)}")
        if self.bos_token_id != other.bos_token_id:
            problems.append(f"bos_token_id {other.bos_token_id} != {self.bos_token_id}")
        if self.tokenizer_fingerprint and other.tokenizer_fingerprint and (
            self.tokenizer_fingerprint != other.tokenizer_fingerprint
        ):
            problems.append("tokenizers map tokens to different ids")
        return "; ".join(problems) or None


def resolve_device(requested: str | torch.device) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(requested)!r}: no CUDA device is visible to this process")
    return device


def resolve_dtype(requested: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU that supports it (float16 otherwise) and float32 on the CPU. Also takes vLLM's
    "half" and "float" and the torch dtypes themselves."""
    if isinstance(requested, torch.dtype):
        if requested in DTYPES.values():
            return requested
    elif requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    elif (dtype := DTYPES.get(requested, DTYPE_ALIASES.get(requested))) is not None:
        return dtype
    raise ValueError(f"dtype {str(requested)!r}: choose one of auto, {', '.join(DTYPES)} (or vLLM's half and float, "
                     "or a torch dtype among these)")


def check_local_path(model_id: str) -> None:
    """OSError for a `model_id` that can only be a local path (absolute, relative from . or .., or of more parts
    than a hub id's owner/name) and is no directory: from_pretrained would call it a malformed hub id."""
    model_id = os.fspath(model_id)
    looks_local = os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1
    if looks_local and not os.path.isdir(model_id):
        raise OSError(f"{model_id}: no such directory (a local model directory; a hub id has the form owner/name)")


def load_causal_lm(model_id: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    check_local_path(model_id)
    log.info("loading %s on %s as %s", model_id, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(model_id: str, required: bool):
    """The model's tokenizer; None when it has none and `required` is False (a draft needs no tokenizer)."""
    from transformers import AutoTokenizer

    try:
        check_local_path(model_id)
        return AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError, TypeError) as exc:
        if required:
            raise
        log.warning("no tokenizer loaded for %s (%s): the vocabulary check compares ids and sizes only", model_id, exc)
        return None


def _optional_id(value) -> int:
    return -1 if value is None else int(value)


def vocabulary_of(model: torch.nn.Module, tokenizer) -> Vocabulary:
    config = model.config
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = config.eos_token_id
    if eos is None and tokenizer is not None:
        # vLLM stops at the tokenizer's EOS. Only when the configs name none: adding it to theirs would set this
        # vocabulary apart from a draft's loaded without a tokenizer, which reads its configs alone.
        eos = tokenizer.eos_token_id
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    fingerprint = ""
    if tokenizer is not None:
        table = "\n".join(f"{tok}\t{idx}" for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
        fingerprint = hashlib.sha256(table.encode()).hexdigest()[:16]
    return Vocabulary(
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        eos_token_ids=eos_ids,
        bos_token_id=_optional_id(config.bos_token_id),
        pad_token_id=_optional_id(config.pad_token_id),
        tokenizer_fingerprint=fingerprint,
    )


def max_context_tokens(model: torch.nn.Module) -> int:
    """Positions the model can attend over: the smallest of CONTEXT_LENGTH_KEYS in its config, or a large bound when
    the config has none of them."""
    lengths = [getattr(model.config, key, None) for key in CONTEXT_LENGTH_KEYS]
    return min((int(length) for length in lengths if length), default=1 << 20)
