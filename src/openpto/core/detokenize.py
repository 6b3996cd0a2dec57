"""Token ids to text, one token at a time, without broken characters or leaked stop strings.

- ``IncrementalDetokenizer`` decodes a growing id sequence and returns only complete new text:
  a byte-level BPE token can end in the middle of a UTF-8 character, which ``decode`` shows as
  U+FFFD; such text is held back until the next token completes the character (vLLM's
  prefix/read offsets). A few prompt tokens are kept as context so that tokenizers which treat
  the first token of a string specially (SentencePiece's leading space) decode as in the whole.
- ``TextStream`` adds stop strings: text is cut just before the first stop string and the stop
  string itself is never emitted; a tail that could still become a stop string is held back until
  it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return str(
            self.tokenizer.decode(
                ids,
                skip_special_tokens=self.skip_special_tokens,
                clean_up_tokenization_spaces=False,
            )
        )

    def add(self, token_id: int) -> str:
        """Append one token; return the new complete text (possibly empty)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back at the end, without a trailing incomplete character."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :].rstrip(_REPLACEMENT)


class TextStream:
    """Detokenizer plus stop strings: ``push`` returns ``(text to emit, stopped)``."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.stop = tuple(stop)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += self.detok.add(token_id)
        return self._release()

    def finish(self) -> str:
        """Everything not yet emitted (held-back stop prefixes, incomplete tail) at the end."""
        if self.stopped:
            return ""
        self.text += self.detok.flush()
        out, _ = self._release(final=True)
        return out

    def _release(self, final: bool = False) -> tuple[str, bool]:
        # Every stop string starts at or after ``sent``: a tail that could begin one is held back.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.sent : cut]
            self.sent = len(self.text)
            self.stopped = True
            return out, True
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out, False

    def _held_back(self) -> int:
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
