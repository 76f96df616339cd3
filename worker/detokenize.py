"""Incremental detokenization: each new token costs a decode of a few tokens, not of the whole output.

Decoding the whole output at every step made a row's cost per token grow with its length. Here
two short windows are decoded (the text the last emitted tokens made, and the same plus the new
ones) and the difference is the new text, as vLLM does it: starting both windows at the same
token keeps a tokenizer's leading-space rules out of the difference. Text is held back while it
ends in a half-decoded character (U+FFFD) and released once the character completes or the row ends.
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # first token of the window that is decoded again for context
        self.read_offset = 0  # first token whose text has not been returned yet

    def push(self, token: int) -> str:
        """Take the next token; return the text it completes ('' while a character is half-decoded)."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(INCOMPLETE):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def finish(self) -> str:
        """The text held back at the end (a character that never completed decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""
