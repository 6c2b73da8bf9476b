"""Tiny real Hugging Face models and a real BPE tokenizer, made at test time (no hub is reachable here).

The builders are `splitspec.demo_models`' (the demo pair is the same design, larger); here are the sizes the
tests use.
"""

import pathlib

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
