"""Tiny real Hugging Face models and a real BPE tokenizer, made at test time (no hub is reachable here).

The builders are `splitspec.demo_models`' (the demo pair is the same design, larger); here are the sizes the
tests use.
"""

import json
import pathlib
import shutil

from splitspec import demo_models
from splitspec.demo_models import first_layers_of  # noqa: F401 (the tests' draft made of the target's first layers)

VOCAB_SIZE = 384


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    return demo_models.build_tokenizer(vocab_size)


def build_llama(seed: int, vocab_size: int = VOCAB_SIZE, hidden_size: int = 64, num_layers: int = 2,
                max_positions: int = 512):
    return demo_models.build_llama(seed, vocab_size, hidden_size, num_layers, max_positions)


def save(model, tokenizer, directory: pathlib.Path) -> str:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return str(directory)


def copy_with_eos(model_dir: str, directory: pathlib.Path, eos_token_id: int | None) -> str:
    """A copy of a saved model whose configs (config.json and generation_config.json) name another EOS, or none."""
    shutil.copytree(model_dir, directory)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((directory / name).read_text())
        (directory / name).write_text(json.dumps(config | {"eos_token_id": eos_token_id}))
    return str(directory)


def build_opt(seed: int, vocab_size: int = VOCAB_SIZE, max_positions: int = 512):
    """A tiny OPT: learned positions with an offset, and a decoder that asks its cache for its length."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab_size, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=max_positions, attn_implementation="sdpa")
    return OPTForCausalLM(config).eval()


def build_gpt2(seed: int, vocab_size: int = VOCAB_SIZE, max_positions: int = 512):
    """A tiny GPT-2: learned absolute positions, exactly `max_positions` of them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=max_positions, n_embd=32, n_layer=2, n_head=2,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()


def build_mpt(seed: int, vocab_size: int = VOCAB_SIZE, max_positions: int = 32):
    """A tiny MPT: ALiBi positions, whose config names its context max_seq_len (not max_position_embeddings)."""
    import torch
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    config = MptConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=vocab_size, max_seq_len=max_positions,
                       bos_token_id=1, eos_token_id=2)
    return MptForCausalLM(config).eval()
