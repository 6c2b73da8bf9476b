"""Incremental detokenization with stop strings, for streaming text as tokens are accepted."""

import os


class IncrementalDetokenizer:
    """Turns generated tokens into text deltas.

    Decodes a short window of recent tokens (as TGI and vLLM do) so that tokenizers which merge a leading space
    or split one character over several byte tokens give the right text; an incomplete character is held back.
    Text that could still turn out to be the start of a stop string is held back too, so a client never sees
    text that is later cut.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids)
        # Decode from a few tokens back, so the first token's leading space is rendered as in context.
        self.prefix_offset = max(len(self.token_ids) - 5, 0)
        self.read_offset = len(self.token_ids)
        self.stop = stop
        self.text = ""  # generated text so far (stop string excluded once found)
        self.stop_string: str | None = None  # the stop string the text was cut at
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self) -> str:
        """What the tokens after `read_offset` add to the text."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.token_ids[self.prefix_offset :])
        if prefix_text.endswith("\ufffd") and not text.startswith(prefix_text):
            # Only a prompt ends so (generated text is held back while it does): inside a character, which the new
            # tokens completed. All of the character is new text, as in vLLM. (After a literal U+FFFD that ends a
            # prompt, the text still starts with it: it stays the prompt's.)
            return text[len(os.path.commonprefix([prefix_text, text])) :]
        return text[len(prefix_text) :]

    def add_token(self, token_id: int) -> None:
        """Append one token; sets `stopped` when the text now contains a stop string (the text is cut before it)."""
        self.token_ids.append(token_id)
        new_text = self._new_text()
        if new_text and not new_text.endswith("\ufffd"):
            search_from = max(len(self.text) - max((len(s) for s in self.stop), default=0), 0)
            self.text += new_text
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            self._check_stop(search_from)

    def _check_stop(self, search_from: int) -> None:
        hits = [(index, stop) for stop in self.stop if (index := self.text.find(stop, search_from)) >= 0]
        if hits:
            # The earliest in the text; of two there, the first listed.
            cut, self.stop_string = min(hits, key=lambda hit: hit[0])
            self.text = self.text[:cut]
            self.stopped = True

    def flush(self) -> None:
        """At the end: render whatever is held back, an incomplete character included."""
        tail = self._new_text()
        if not self.stopped and tail:
            search_from = max(len(self.text) - max((len(s) for s in self.stop), default=0), 0)
            self.text += tail
            self._check_stop(search_from)
        self.read_offset = len(self.token_ids)

    def take_delta(self, final: bool) -> str:
        """Text not returned yet; until `final`, minus a tail that might begin a stop string."""
        upto = len(self.text)
        if not final and self.stop:
            upto -= max(len(s) for s in self.stop) - 1
        delta = self.text[self.emitted : max(upto, self.emitted)]
        self.emitted += len(delta)
        return delta
