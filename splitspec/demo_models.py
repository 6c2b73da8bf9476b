"""A synthetic target/draft pair, built offline, whose greedy acceptance rate is a knob.

No model hub is reachable from every machine, so `splitspec-demo-models` makes the pair itself, deterministically,
as ordinary Hugging Face checkpoints (config.json, model.safetensors, tokenizer files):

  tokenizer - byte-level BPE trained with `tokenizers` on standard-library modules that ship with Python.
  target    - a randomly initialised Llama (16 layers, width 512, 4096 tokens); its head is scaled x8 so that its
              next-token distributions are peaked rather than flat, and the head rows of tokens that do not
              decode to printable ASCII are zeroed, so that the text shows in a terminal.
  draft     - the target's first layer, its embeddings, final norm and head: one layer instead of sixteen, so one
              draft step costs about a tenth of a target step. The "deep-draft" shapes keep more of its first layers
              (6 of 16): a draft step then costs about 0.4 of one, and drafting a block about as much as verifying it.
  epsilon   - the target's further layers write into the residual stream through `o_proj` and `down_proj`; both are
              scaled by epsilon. At epsilon = 0 the target's logits are the draft's; a larger epsilon perturbs them
              more, and the draft's argmax then disagrees with the target's more often.

The knob is the expected greedy acceptance rate alpha: the probability that the draft's next token equals the
target's, along the target's own greedy continuation (alpha of Leviathan et al. 2023). Each shape's
`calibration` maps epsilon to the alpha measured here; `epsilon_for` interpolates it, and every build measures and
records the alpha it got. The pair is synthetic: its text is fluent-looking token salad, not language.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import pathlib
import shutil
import string
import sys
import sysconfig
import tempfile
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
PAIR_FILE = "pair.json"  # written last: a directory without it is an unfinished build
BUILD_VERSION = 1  # bump when a change alters the weights, so that cached pairs are rebuilt


@dataclasses.dataclass(frozen=True)
class PairShape:
    """Sizes of the target; the draft is its first `draft_layers` layers."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_positions: int
    text_modules: tuple[str, ...]  # standard-library modules the tokenizer is trained on
    # (epsilon, alpha) by falling alpha: alpha measured by `splitspec-demo-models --calibrate` (32 prompts x 96 tokens)
    calibration: tuple[tuple[float, float], ...]
    draft_layers: int = 1


TINY_TEXT = ("textwrap", "this", "shlex")
DEMO_TEXT = TINY_TEXT + ("argparse", "functools", "difflib", "subprocess", "typing", "dataclasses", "enum", "random",
                         "statistics", "heapq", "inspect", "string", "calendar", "fractions", "pprint", "contextlib")
# ~55M parameters: one target step ~30 ms on one core here, one draft step ~3 ms.
DEMO_SHAPE = PairShape(4096, 512, 1376, 16, 8, 8, 2048, DEMO_TEXT,
                       ((0.003, 0.95), (0.005, 0.92), (0.01, 0.88), (0.015, 0.80), (0.02, 0.74), (0.03, 0.67),
                        (0.04, 0.56), (0.05, 0.49), (0.06, 0.42)))
# For tests: builds and runs in about a second. Three perturbed layers instead of fifteen: a larger epsilon.
TINY_SHAPE = PairShape(512, 64, 128, 4, 4, 2, 1024, TINY_TEXT,
                       ((0.05, 0.95), (0.1, 0.90), (0.15, 0.84), (0.2, 0.80), (0.3, 0.70), (0.4, 0.61), (0.5, 0.50),
                        (0.6, 0.39)))
SHAPES = {
    "demo": DEMO_SHAPE,
    # The same target with a draft of its first 6 layers: a draft step ~0.4 target step on a CPU, so that drafting
    # k = 3-4 tokens takes about as long as verifying them (k x draft step ~ verify), as a CPU draft beside a GPU
    # target does; where drafting ahead has the most to hide. Tokenizer and unscaled target: "demo"'s.
    "demo-deep-draft": dataclasses.replace(DEMO_SHAPE, draft_layers=6, calibration=(
        (0.005, 0.98), (0.01, 0.96), (0.015, 0.94), (0.02, 0.92), (0.03, 0.89), (0.05, 0.83), (0.08, 0.74),
        (0.12, 0.64), (0.2, 0.48))),
    "tiny": TINY_SHAPE,
    "tiny-deep-draft": dataclasses.replace(TINY_SHAPE, draft_layers=2, calibration=(
        (0.05, 0.93), (0.1, 0.87), (0.2, 0.75), (0.3, 0.69), (0.5, 0.50))),
}


def training_text(module_names: tuple[str, ...] = TINY_TEXT) -> list[str]:
    """The source of standard-library modules: text that ships with every Python."""
    lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [(lib / f"{name}.py").read_text(encoding="utf-8") for name in module_names]


def build_tokenizer(vocab_size: int, module_names: tuple[str, ...] = TINY_TEXT) -> PreTrainedTokenizerFast:
    """Byte-level BPE (like GPT-2's) trained on `module_names`: any text encodes, and decodes back exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(training_text(module_names), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_llama(seed: int, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, max_positions: int = 512,
                intermediate_size: int | None = None, num_attention_heads: int = 4,
                num_key_value_heads: int = 2) -> LlamaForCausalLM:
    """A randomly initialised Llama; the same arguments give the same weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_positions, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    # Peaked distributions: random models are otherwise so flat that sampled text is noise.
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


def scale_layers_after(model: LlamaForCausalLM, first: int, epsilon: float) -> None:
    """Scale what layers `first`.. add to the residual stream: the model's logits move away from those of its
    first `first` layers by an amount that grows with epsilon."""
    with torch.no_grad():
        for layer in model.model.layers[first:]:
            layer.self_attn.o_proj.weight.mul_(epsilon)
            layer.mlp.down_proj.weight.mul_(epsilon)


def acceptance_range(shape: PairShape) -> tuple[float, float]:
    alphas = [alpha for _, alpha in shape.calibration]
    return min(alphas), max(alphas)


def silence_unprintable_tokens(model: LlamaForCausalLM, tokenizer) -> None:
    """Zero the head rows of tokens that do not decode to printable ASCII (lone bytes of a UTF-8 sequence, control
    characters, special tokens): their logit becomes 0, far below the peaked maximum, so generated text stays
    readable in a terminal. EOS is among them: the pair generates until max_new_tokens."""
    allowed = set(string.printable) - set("\r\x0b\x0c")
    silenced = [token_id for token_id in range(model.config.vocab_size)
                if token_id in tokenizer.all_special_ids or not set(tokenizer.decode([token_id])) <= allowed]
    with torch.no_grad():
        model.lm_head.weight[silenced] = 0


def base_target(shape: PairShape, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """The target before its layers after the draft's are scaled."""
    model = build_llama(seed, shape.vocab_size, shape.hidden_size, shape.num_layers, shape.max_positions,
                        shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads)
    silence_unprintable_tokens(model, tokenizer)
    return model


def epsilon_for(shape: PairShape, acceptance: float) -> float:
    """The epsilon whose measured alpha is `acceptance`, interpolated from the shape's calibration (log-linear)."""
    low, high = acceptance_range(shape)
    if not low <= acceptance <= high:
        raise ValueError(f"acceptance must be in [{low}, {high}], got {acceptance}")
    for (eps_lo, alpha_hi), (eps_hi, alpha_lo) in zip(shape.calibration, shape.calibration[1:]):
        if alpha_lo <= acceptance <= alpha_hi:
            t = (alpha_hi - acceptance) / (alpha_hi - alpha_lo)
            return math.exp(math.log(eps_lo) + t * (math.log(eps_hi) - math.log(eps_lo)))
    raise AssertionError("a calibration must be sorted by falling alpha")


def text_prompts(tokenizer, module_names: tuple[str, ...], count: int, length: int) -> torch.Tensor:
    """`count` prompts of `length` tokens, cut at even steps from the tokenizer's training text  # [count, length]"""
    ids = tokenizer.encode("\n".join(training_text(module_names)))
    step = (len(ids) - length) // count
    return torch.tensor([ids[i * step: i * step + length] for i in range(count)])


@torch.inference_mode()
def greedy_continuation(model, prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy tokens after each prompt (no EOS stop)  # prompts [batch, length] -> [batch, max_new_tokens]"""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompts, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # [batch, vocab]
    generated = []
    for _ in range(max_new_tokens):
        next_ids = logits.argmax(dim=-1)  # [batch]
        generated.append(next_ids)
        logits = model(input_ids=next_ids[:, None], cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return torch.stack(generated, dim=1)


@torch.inference_mode()
def measure_acceptance(target, draft, prompts: torch.Tensor, max_new_tokens: int) -> float:
    """Greedy alpha: how often the draft's argmax is the target's next token along the target's own continuation.
    That is the chance that a draft token is accepted, given that the ones before it were."""
    threads = torch.get_num_threads()
    # One thread: on a busy machine, OpenMP threads waiting on each other made this ten times slower.
    torch.set_num_threads(1)
    try:
        return _agreement(target, draft, prompts, max_new_tokens)
    finally:
        torch.set_num_threads(threads)


def _agreement(target, draft, prompts: torch.Tensor, max_new_tokens: int) -> float:
    continuation = greedy_continuation(target, prompts, max_new_tokens)  # [batch, n]
    sequence = torch.cat([prompts, continuation], dim=1)  # [batch, length + n]
    draft_next = draft(input_ids=sequence).logits[:, prompts.shape[1] - 1: -1].argmax(dim=-1)  # [batch, n]
    return float((draft_next == continuation).float().mean())


@dataclasses.dataclass(frozen=True)
class DemoPair:
    """A built pair; `measured_acceptance` is the greedy alpha measured on it when it was built."""

    directory: str
    shape: str
    acceptance: float  # the knob
    epsilon: float
    measured_acceptance: float
    build_version: int = BUILD_VERSION

    @property
    def target_dir(self) -> str:
        return str(pathlib.Path(self.directory) / "target")

    @property
    def draft_dir(self) -> str:
        return str(pathlib.Path(self.directory) / "draft")


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "splitspec" / "demo-models"


def pair_name(shape: str, acceptance: float) -> str:
    return f"{shape}-alpha{acceptance:.2f}"


def build_pair(directory: pathlib.Path, shape_name: str, acceptance: float, seed: int = 0, log=print) -> DemoPair:
    """Build target and draft into `directory` (replaced as a whole once the build is complete)."""
    if directory.exists() and any(directory.iterdir()) and not (directory / PAIR_FILE).exists():
        raise FileExistsError(f"{directory} is not empty and holds no demo pair: not replacing it")
    shape = SHAPES[shape_name]
    epsilon = epsilon_for(shape, acceptance)
    started = time.monotonic()
    log(f"building the {shape_name} pair for alpha {acceptance:.2f} (epsilon {epsilon:.4f}) in {directory} ...")
    tokenizer = build_tokenizer(shape.vocab_size, shape.text_modules)
    target = base_target(shape, tokenizer, seed)
    scale_layers_after(target, shape.draft_layers, epsilon)
    draft = first_layers_of(target, shape.draft_layers)
    measured = measure_acceptance(target, draft, text_prompts(tokenizer, shape.text_modules, 16, 16), 64)
    log(f"  measured greedy alpha {measured:.3f}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    staging.chmod(0o755)
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per file is noise here
    pair = DemoPair(str(directory), shape_name, acceptance, epsilon, measured)
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(staging / name)
        tokenizer.save_pretrained(staging / name)
    (staging / PAIR_FILE).write_text(json.dumps(dataclasses.asdict(pair), indent=2) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    log(f"  done in {time.monotonic() - started:.0f}s")
    return pair


def load_pair(directory: pathlib.Path) -> DemoPair | None:
    """The pair built in `directory`, or None when there is none (or it was built by another version)."""
    try:
        pair = DemoPair(**json.loads((directory / PAIR_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return dataclasses.replace(pair, directory=str(directory)) if pair.build_version == BUILD_VERSION else None


def ensure_pair(acceptance: float, shape: str = "demo", directory: pathlib.Path | None = None, log=print) -> DemoPair:
    """The cached pair for (shape, acceptance), built first when missing."""
    directory = directory or default_cache_dir() / pair_name(shape, acceptance)
    pair = load_pair(directory)
    if pair is not None and pair.shape == shape and abs(pair.acceptance - acceptance) < 1e-9:
        return pair
    return build_pair(directory, shape, acceptance, log=log)


def calibrate(shape_name: str, epsilons: list[float] | None = None) -> list[tuple[float, float]]:
    """Alpha measured at the shape's calibration epsilons (about a minute on the demo shape), to refresh them."""
    shape = SHAPES[shape_name]
    tokenizer = build_tokenizer(shape.vocab_size, shape.text_modules)
    prompts = text_prompts(tokenizer, shape.text_modules, 32, 16)
    base = base_target(shape, tokenizer)
    draft = first_layers_of(base, shape.draft_layers)
    results = []
    for epsilon in epsilons or [epsilon for epsilon, _ in shape.calibration]:
        target = copy.deepcopy(base)
        scale_layers_after(target, shape.draft_layers, epsilon)
        results.append((epsilon, measure_acceptance(target, draft, prompts, 96)))
        print(f"epsilon {epsilon:.4f}: alpha {results[-1][1]:.3f}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="splitspec-demo-models",
        description="Build (once; later runs reuse it) a synthetic target/draft pair whose greedy acceptance rate "
                    "is about --acceptance, as Hugging Face checkpoints: OUTPUT/target and OUTPUT/draft.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    low, high = acceptance_range(SHAPES["demo"])
    parser.add_argument("--acceptance", type=float, default=0.9,
                        help=f"Expected greedy acceptance rate alpha, in [{low}, {high}] (demo shape).")
    parser.add_argument("--output", type=pathlib.Path, default=None,
                        help=f"Directory of the pair. Default: {default_cache_dir()}/{pair_name('demo', 0.9)} "
                             "(with the shape and acceptance asked for).")
    parser.add_argument("--shape", default="demo", choices=sorted(SHAPES), help="Model sizes (tiny: for tests).")
    parser.add_argument("--force", action="store_true", help="Rebuild even when the pair is already there.")
    parser.add_argument("--calibrate", action="store_true",
                        help="Instead of building, measure alpha at the shape's calibration epsilons.")
    args = parser.parse_args(argv)
    if args.calibrate:
        calibrate(args.shape)
        return 0
    low, high = acceptance_range(SHAPES[args.shape])
    if not low <= args.acceptance <= high:
        parser.error(f"--acceptance must be in [{low}, {high}] for the {args.shape} shape")
    directory = args.output or default_cache_dir() / pair_name(args.shape, args.acceptance)
    try:
        if args.force:
            pair = build_pair(directory, args.shape, args.acceptance)
        else:
            pair = ensure_pair(args.acceptance, args.shape, directory)
    except FileExistsError as exc:
        print(f"splitspec-demo-models: error: {exc}", file=sys.stderr)
        return 2
    print(f"target: {pair.target_dir}\ndraft:  {pair.draft_dir}\n"
          f"greedy alpha measured at build: {pair.measured_acceptance:.3f} (asked for {pair.acceptance:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
