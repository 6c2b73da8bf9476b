"""GenerateRequest from keyword arguments: the one place that knows the request's fields, for Client and AsyncClient.

Ranges are not checked here: the server validates every field and answers INVALID_ARGUMENT naming it, so the
rules live in one place. Only what the message cannot hold fails early, naming the field: a wrong Python type as
TypeError, an integer beyond the field's range or a string that is not valid text (a lone surrogate) as ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

from .v1 import common_pb2, target_pb2


def build_generate_request(
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    num_speculative_tokens: int | None = None,
    request_id: str = "",
) -> target_pb2.GenerateRequest:
    """Build a GenerateRequest; each argument is the proto field of the same name (see target.proto).

    `prompt` is text, or a list/tuple of token ids. temperature 0 decodes greedily. A None top_p, seed or
    num_speculative_tokens leaves the field unset, so that the server's default applies (top_p 1.0, a random seed,
    the server's number of draft tokens); num_speculative_tokens=0 turns speculation off.
    """
    if isinstance(prompt, str):
        prompt_field = {"prompt": prompt}
    elif isinstance(prompt, (list, tuple)):
        prompt_field = {"prompt_token_ids": prompt}
    else:
        raise TypeError(f"prompt: expected str or a list of token ids, got {type(prompt).__name__}")
    if isinstance(stop, str):
        # A bare string is a sequence of characters: every character would become a stop string.
        raise TypeError("stop: expected a sequence of strings, got str; wrap a single stop string in a list")
    sampling = _message(common_pb2.SamplingParams, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return _message(
        target_pb2.GenerateRequest,
        **prompt_field,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop=stop,
        ignore_eos=ignore_eos,
        num_speculative_tokens=num_speculative_tokens,
        request_id=request_id,
    )


def _message(cls, **fields):
    """`cls(**fields)` leaving out the None ones, with the field's name in a type error (protobuf omits it)."""
    message = cls()
    for name, value in fields.items():
        if value is None:
            continue
        try:
            # Merging a one-field message keeps proto3 presence: an optional field explicitly set to 0 stays set.
            message.MergeFrom(cls(**{name: value}))
        except (TypeError, ValueError) as err:
            # TypeError or ValueError itself: a subclass such as UnicodeEncodeError (a lone surrogate in a string)
            # takes other constructor arguments.
            raise (TypeError if isinstance(err, TypeError) else ValueError)(f"{name}: {err}") from None
    return message
