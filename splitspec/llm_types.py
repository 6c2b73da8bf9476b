"""What the offline API (`splitspec.LLM`) takes and returns, shaped like vLLM's classes of the same names.

`SamplingParams` here is vLLM's: it is what `LLM.generate` takes, with vLLM's defaults (temperature 1.0,
max_tokens 16). It is not `splitspec.sampling.SamplingParams`, the engine's and the wire's (temperature, top_k,
top_p, seed), which `LLM` builds from it. Plain Python: importing this module costs no torch.
"""

import dataclasses
import math

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
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE


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
