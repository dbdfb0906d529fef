"""Stop strings, tested as tokens are generated, without decoding the whole output every step.

`IncrementalText` turns ids into text a few tokens at a time, the way vLLM and TGI stream text:
it decodes a short window twice (from `prefix` to the last emitted token, and to the new token)
and emits the difference. Starting the window a few tokens back keeps the tokenizer's handling
of word boundaries (a leading space, a byte-level merge) the same as in a full decode, and text
ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token. The window starts on
the prompt's last tokens, so the first generated word decodes as it would after the prompt.

`StopStringMatcher` keeps only the last `longest stop - 1` characters besides the new text, so a
stop string split across tokens is found, at a constant cost per step. Everything is a function
of the token ids: every rank that tests a row decides the same.

The final text is decoded once from the kept ids and cut before the first stop string
(`trim_at_stop`); as in OpenAI's API, the stop string is not part of the text. The ids keep the
token that completed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

Decode = Callable[[Sequence[int]], str]  # ids -> text, special tokens skipped
CONTEXT_TOKENS = 5  # prompt tokens the first window starts from (as vLLM)
INCOMPLETE = "\ufffd"  # what a decoder gives for a cut UTF-8 sequence


class IncrementalText:
    def __init__(self, decode: Decode, context: Sequence[int] = ()):
        self._decode = decode
        self._ids = [int(t) for t in context[-CONTEXT_TOKENS:]]
        self._prefix = 0  # the window decoded each step starts here
        self._read = len(self._ids)  # ids before this are emitted

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        # The next window starts at the ids emitted now; the ones before it are never decoded
        # again, so drop them: each step costs the same however long the output grows.
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        return after[len(before):]


class StopStringMatcher:
    """True from `push` once the output holds one of `stops`."""

    def __init__(self, stops: Sequence[str], decode: Decode, context: Sequence[int] = ()):
        if not stops or any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._keep = max(len(s) for s in stops) - 1  # a stop string may start this far back
        self._text = IncrementalText(decode, context)
        self._tail = ""

    def push(self, token_id: int) -> bool:
        new = self._text.push(token_id)
        if not new:
            return False
        window = self._tail + new
        if any(stop in window for stop in self._stops):
            return True
        self._tail = window[len(window) - self._keep:] if self._keep else ""
        return False


@dataclass(frozen=True)
class StopStrings:
    """A row's stop strings: calling it makes a fresh matcher (one per block row)."""

    stops: tuple[str, ...]
    decode: Decode
    context: tuple[int, ...] = ()  # the prompt's last tokens

    def __call__(self) -> StopStringMatcher:
        return StopStringMatcher(self.stops, self.decode, self.context)


def trim_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string in it; all of it when there is none."""
    cut = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))
    return text[:cut]
