"""Tiny real Hugging Face models and a real BPE tokenizer, made at test time (no hub is reachable here)."""

import pathlib
import sysconfig

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2


def training_text() -> list[str]:
    """Text that ships with Python: a few standard-library modules."""
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [(lib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "this.py", "shlex.py")]


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_llama(seed: int, vocab_size: int = VOCAB_SIZE, hidden_size: int = 64, num_layers: int = 2,
                max_positions: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    # Peaked distributions: random tiny models are otherwise so flat that sampled text is noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def first_layers_of(model: LlamaForCausalLM, num_layers: int) -> LlamaForCausalLM:
    """A draft made of the target's first layers and its head: it agrees with the target often, not always."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = num_layers
    draft = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")
             or int(k.split(".")[2]) < num_layers}
    draft.load_state_dict(state)
    return draft


def save(model, tokenizer, directory: pathlib.Path) -> str:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return str(directory)
