"""What the offline API (`splitspec.LLM`) takes and returns, shaped like vLLM's classes of the same names.

`SamplingParams` here is vLLM's: it is what `LLM.generate` takes, with vLLM's defaults (temperature 1.0,
max_tokens 16). It is not `splitspec.sampling.SamplingParams`, the engine's and the wire's (temperature, top_k,
top_p, seed), which `LLM` builds from it. `parse_prompts` reads `LLM.generate`'s prompts. Plain Python: importing
this module costs no torch.
"""

import dataclasses
import math
import numbers
from collections.abc import Iterable

# Below this, vLLM samples greedily; so does splitspec.
_GREEDY_TEMPERATURE = 1e-5

# vLLM fields splitspec does not implement, with the values that mean "off". Any other value is refused: each of
# them would change the distribution the target samples from, or needs output splitspec does not compute.
_UNSUPPORTED = {
    "best_of": (None, 1),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "min_p": (0.0,),
    "stop_token_ids": (None, []),
    "min_tokens": (0,),
    "logprobs": (None,),
    "prompt_logprobs": (None,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "logits_processors": (None, []),
    "truncate_prompt_tokens": (None,),
    "bad_words": (None, []),
    "logit_bias": (None, {}),
    "allowed_token_ids": (None, []),
}


@dataclasses.dataclass
class SamplingParams:
    """vLLM's sampling parameters. Supported: temperature (below 1e-5: greedy), top_p, top_k (-1 or 0: all tokens),
    seed, max_tokens (None: up to the model's context), stop, ignore_eos, include_stop_str_in_output, detokenize.
    Only n=1. The other vLLM fields are accepted at their default ("off") values; any other value raises ValueError.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: list | None = None
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        # numpy's ints and floats pass as Python's, into which they are turned (the wire takes no numpy scalars).
        self.n, self.top_k = _as_int("n", self.n), _as_int("top_k", self.top_k)
        self.seed = _as_int("seed", self.seed, optional=True)
        self.max_tokens = _as_int("max_tokens", self.max_tokens, optional=True)
        self.temperature, self.top_p = _as_float("temperature", self.temperature), _as_float("top_p", self.top_p)
        if self.n != 1:
            raise ValueError(f"n must be 1: splitspec returns one completion per prompt, got n={self.n}")
        for name, off in _UNSUPPORTED.items():
            value = getattr(self, name)
            if value not in off:
                raise ValueError(f"{name}={value!r} is not supported by splitspec; leave it at {off[0]!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if math.isnan(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (all tokens) or positive, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_int(name: str, value, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {value!r}")
    return int(value)


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


_PROMPT = "a string, a list of token ids or a dict with 'prompt' or 'prompt_token_ids'"


def _tolist_hint(value) -> str:
    # A tensor's or an array's elements are not the ints the wire takes; tolist() makes them so.
    return "; pass token ids as a list (.tolist())" if hasattr(value, "tolist") else ""


def parse_prompts(prompts) -> list[tuple[str | None, list[int] | None]]:
    """`LLM.generate`'s prompts as (text, None) or (text or None, token ids) per prompt; TypeError naming what is
    wrong. Token ids may be numpy integers, as in vLLM; the range is checked against the vocabulary later."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                            and all(map(_is_int, prompts))):
        prompts = [prompts]
    elif (not isinstance(prompts, Iterable) or isinstance(prompts, (bytes, bytearray))
          or hasattr(prompts, "tolist")):
        raise TypeError(f"prompts: expected {_PROMPT}, or a list of these, got {type(prompts).__name__}"
                        f"{_tolist_hint(prompts)}")
    return [_parse_prompt(index, prompt) for index, prompt in enumerate(prompts)]


def _parse_prompt(index: int, prompt) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        text, token_ids = prompt.get("prompt"), prompt["prompt_token_ids"]
    elif isinstance(prompt, dict) and "prompt" in prompt:
        text, token_ids = prompt["prompt"], None
    elif isinstance(prompt, str):
        text, token_ids = prompt, None
    elif isinstance(prompt, (list, tuple)):
        text, token_ids = None, prompt
    else:
        raise TypeError(f"prompt {index}: expected {_PROMPT}, got {type(prompt).__name__}{_tolist_hint(prompt)}")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"prompt {index}: 'prompt' must be a string, got {type(text).__name__}")
    if token_ids is None:
        return text, None
    if isinstance(token_ids, (str, bytes, dict)) or not isinstance(token_ids, Iterable):
        raise TypeError(f"prompt {index}: prompt_token_ids must be a list of ints, got {type(token_ids).__name__}")
    token_ids = list(token_ids)
    if not_ints := [t for t in token_ids if not _is_int(t)]:
        raise TypeError(f"prompt {index}: token ids must be ints, got {not_ints[0]!r}{_tolist_hint(not_ints[0])}")
    return text, [int(t) for t in token_ids]


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """vLLM's request timings (seconds since the epoch, as `time.time()`), then this request's speculative decoding
    counters, named as in the wire protocol's `GenerationStats`."""

    arrival_time: float  # generate() was called
    first_scheduled_time: float  # the request got one of the max_num_seqs slots
    first_token_time: float
    last_token_time: float
    finished_time: float
    time_in_queue: float  # seconds from arrival to first_scheduled_time
    rounds: int  # verification forwards of the target (each emits accepted_len + 1 tokens)
    num_drafts: int  # blocks of draft tokens verified
    num_draft_tokens: int
    num_accepted_tokens: int
    num_accepted_tokens_per_pos: tuple[int, ...]  # [i]: blocks whose draft token i was accepted
    acceptance_rate: float  # num_accepted_tokens / num_draft_tokens
    mean_accepted_length: float  # tokens emitted per verified block: 1 + num_accepted_tokens / num_drafts
    draft_server: str  # address of the draft that served the request; empty when none did
    fallback_reason: str  # why the request finished without a draft, if it did


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: None = None
    finish_reason: str | None = None  # "length", or "stop" (an end-of-sequence token or a stop string)
    stop_reason: int | str | None = None  # the stop string that ended the text; None for EOS and "length"

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: None = None
