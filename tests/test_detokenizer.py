"""The incremental detokenizer with the tests' byte-level BPE tokenizer: prompts that end inside a character."""

from tiny_models import build_tokenizer

from target_server.detokenizer import IncrementalDetokenizer

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
