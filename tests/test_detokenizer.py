"""Incremental detokenization with stop strings, token by token: against a byte-level tokenizer whose pieces the
tests choose (a character split over two tokens, a stop string split over tokens, two stop strings in one token),
and against the tests' byte-level BPE tokenizer (prompts that end inside a character)."""

from target_server.detokenizer import IncrementalDetokenizer
from tiny_models import build_tokenizer


class PieceTokenizer:
    """Token id i is the bytes `pieces[i]`; decoding joins them and replaces an incomplete UTF-8 character with
    U+FFFD, as byte-level BPE tokenizers do."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def stream(pieces: list[bytes], stop: tuple[str, ...], prompt: list[bytes] = (b"Q:",)) -> tuple[list[str], bool, int]:
    """Feed `pieces` after `prompt` as the engine does; returns the deltas (the last from the final take), whether a
    stop string was found and how many tokens were fed until then."""
    tokenizer = PieceTokenizer(list(prompt) + list(pieces))
    detokenizer = IncrementalDetokenizer(tokenizer, list(range(len(prompt))), stop)
    deltas, fed = [], 0
    for token_id in range(len(prompt), len(prompt) + len(pieces)):
        detokenizer.add_token(token_id)
        fed += 1
        if detokenizer.stopped:
            break
        deltas.append(detokenizer.take_delta(final=False))
    detokenizer.flush()
    deltas.append(detokenizer.take_delta(final=True))
    return deltas, detokenizer.stopped, fed


def test_a_character_split_over_two_tokens_is_held_back_until_complete():
    pieces = [b"caf", b"\xc3", b"\xa9", b" ok"]  # "é" is two bytes, one token each
    deltas, stopped, _ = stream(pieces, stop=())
    assert "".join(deltas) == "café ok" and not stopped
    assert deltas[:3] == ["caf", "", "é"]  # never a U+FFFD that the next token would have to take back


def test_an_incomplete_character_at_the_end_is_flushed():
    deltas, _, _ = stream([b"ab", b"\xc3"], stop=())
    assert "".join(deltas) == "ab\ufffd"


def test_a_stop_string_split_over_tokens_cuts_the_text_where_it_begins():
    pieces = [b"abc", b" x", b"y", b"z", b" more"]
    deltas, stopped, fed = stream(pieces, stop=("xyz",))
    assert stopped and fed == 4
    # "x" and "y" arrived before "z": they were held back, never sent and then cut.
    assert all("x" not in delta for delta in deltas)
    assert "".join(deltas) == "abc "


def test_a_stop_string_that_began_tokens_ago_is_found():
    # "lo w" begins in the first token's text, two tokens before the one that completes it.
    deltas, stopped, fed = stream([b"hel", b"lo", b" ", b"wor", b"ld"], stop=("lo w",))
    assert stopped and fed == 4
    assert "".join(deltas) == "hel"


def test_of_two_stop_strings_in_one_token_the_earlier_cuts():
    deltas, stopped, fed = stream([b"a", b"bcd", b"e"], stop=("d", "b"))
    assert stopped and fed == 2
    assert "".join(deltas) == "a"


def test_without_stop_strings_nothing_is_held_back():
    deltas, _, _ = stream([b"one", b" two"], stop=())
    assert deltas == ["one", " two", ""]


# --- the tests' BPE tokenizer: prompts cut inside a character ---------------------------------------------------

TOKENIZER = build_tokenizer()


def completion_text(prompt_token_ids: list[int], token_ids: list[int]) -> str:
    detokenizer = IncrementalDetokenizer(TOKENIZER, prompt_token_ids, ())
    for token_id in token_ids:
        detokenizer.add_token(token_id)
    detokenizer.flush()
    return detokenizer.take_delta(final=True)


def test_a_completion_continued_from_inside_a_character_renders_the_whole_character():
    """Token ids cut inside a character (a completion that ended there, continued): the tokens that complete it
    render all of it, as in vLLM; it was dropped."""
    token_ids = TOKENIZER.encode("Hello 😀 world 日本")
    emoji_bytes = [i for i, t in enumerate(token_ids) if TOKENIZER.decode([t]) == "\ufffd"][:4]
    assert len(emoji_bytes) == 4  # this tokenizer spells the emoji as its 4 bytes
    for cut in emoji_bytes[1:]:
        assert completion_text(token_ids[:cut], token_ids[cut:]) == "😀 world 日本"


def test_a_prompt_ending_in_a_literal_replacement_character_keeps_it():
    """U+FFFD itself (not an incomplete character) that ends a prompt stays the prompt's."""
    prompt_token_ids = TOKENIZER.encode("broken \ufffd")
    assert completion_text(prompt_token_ids, TOKENIZER.encode(" then more")) == " then more"
