"""A validated generation request, built from a GenerateRequest message (`from_pb`)."""

import dataclasses
import uuid

from splitspec_client.v1 import target_pb2

from splitspec import wire
from splitspec.errors import InvalidArgument, ResourceExhausted
from splitspec.sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_SEQUENCE_CHARS = 256


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the target server accepts; fixed at start-up.

    The model's own context is a property of the request (INVALID_ARGUMENT when exceeded); the operator's limits
    below are capacity (RESOURCE_EXHAUSTED), as TGI's --max-input-tokens and --max-total-tokens are.
    """

    vocab_size: int
    max_context_tokens: int
    num_speculative_tokens: int  # default per request
    max_num_speculative_tokens: int
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None  # prompt + max_new_tokens
    max_stop_sequences: int = 16
    # A prompt text longer than this cannot fit the model's context (`max_prompt_chars`); it is refused before it is
    # tokenized, which takes seconds for megabytes. None: no such bound.
    max_prompt_chars: int | None = None


def max_prompt_chars(tokenizer, max_context_tokens: int) -> int | None:
    """The most characters a prompt can have and still fit `max_context_tokens`: no token covers more characters
    than the longest entry of the tokenizer's vocabulary (byte-level entries spell each byte as a character, so
    this holds for any text). None when the tokenizer lists no vocabulary."""
    vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    longest = max(map(len, vocabulary), default=0)
    return longest * max_context_tokens if longest else None


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...]
    ignore_eos: bool
    num_speculative_tokens: int


def from_pb(message: target_pb2.GenerateRequest, tokenizer, limits: Limits) -> GenerationRequest:
    """Validate every field; a bad one raises InvalidArgument naming it."""
    if message.prompt and message.prompt_token_ids:
        raise InvalidArgument("prompt", "set either prompt or prompt_token_ids, not both")
    if message.prompt:
        prompt = message.prompt
        if limits.max_prompt_chars is not None and len(prompt) > limits.max_prompt_chars:
            raise InvalidArgument(
                "prompt", f"{len(prompt)} characters cannot fit the model's context of {limits.max_context_tokens} "
                          f"tokens (a prompt has at most {limits.max_prompt_chars} characters here)"
            )
        prompt_token_ids = tokenizer.encode(prompt)
        if not prompt_token_ids:
            raise InvalidArgument("prompt", "tokenizes to no tokens")
    elif message.prompt_token_ids:
        prompt_token_ids = list(message.prompt_token_ids)
        bad = [t for t in prompt_token_ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidArgument("prompt_token_ids", f"ids must be in [0, {limits.vocab_size}), got {bad[:5]}")
    else:
        raise InvalidArgument("prompt", "must not be empty (set prompt or prompt_token_ids)")

    sampling = wire.sampling_from_pb(message.sampling)
    sampling.validate()

    max_new_tokens = message.max_new_tokens if message.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 1:
        raise InvalidArgument("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    room = limits.max_context_tokens - len(prompt_token_ids)
    if room < 1:
        raise InvalidArgument(
            "prompt", f"{len(prompt_token_ids)} tokens leave no room in the model's context of "
                      f"{limits.max_context_tokens} tokens"
        )
    if max_new_tokens > room:
        raise InvalidArgument(
            "max_new_tokens", f"{max_new_tokens} + {len(prompt_token_ids)} prompt tokens exceed the model's context "
                              f"of {limits.max_context_tokens} tokens (at most {room} new tokens for this prompt)"
        )

    if limits.max_input_tokens is not None and len(prompt_token_ids) > limits.max_input_tokens:
        raise ResourceExhausted(
            f"prompt: {len(prompt_token_ids)} tokens exceed this server's --max-input-tokens {limits.max_input_tokens}"
        )
    total_tokens = len(prompt_token_ids) + max_new_tokens
    if limits.max_total_tokens is not None and total_tokens > limits.max_total_tokens:
        raise ResourceExhausted(
            f"max_new_tokens: {len(prompt_token_ids)} prompt + {max_new_tokens} new tokens exceed this server's "
            f"--max-total-tokens {limits.max_total_tokens}"
        )

    if len(message.stop) > limits.max_stop_sequences:
        raise InvalidArgument("stop", f"at most {limits.max_stop_sequences} stop sequences, got {len(message.stop)}")
    for stop in message.stop:
        if not stop or len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidArgument("stop", f"each stop sequence must have 1 to {MAX_STOP_SEQUENCE_CHARS} characters")

    if message.HasField("num_speculative_tokens"):
        num_speculative_tokens = message.num_speculative_tokens
        if not 0 <= num_speculative_tokens <= limits.max_num_speculative_tokens:
            raise InvalidArgument(
                "num_speculative_tokens",
                f"must be in [0, {limits.max_num_speculative_tokens}], got {num_speculative_tokens}",
            )
    else:
        num_speculative_tokens = limits.num_speculative_tokens

    return GenerationRequest(
        request_id=message.request_id or uuid.uuid4().hex[:16],
        prompt_token_ids=prompt_token_ids,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop=tuple(message.stop),
        ignore_eos=message.ignore_eos,
        num_speculative_tokens=num_speculative_tokens,
    )
