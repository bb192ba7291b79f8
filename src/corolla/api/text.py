"""Pure text handling of a generation: incremental detokenisation and stop strings.

Tokens arrive one at a time; ``IncrementalDecoder`` turns them into text increments without ever
emitting half a character (a byte-level token may end inside a UTF-8 sequence), and ``StopScanner``
holds back text that might be the beginning of a stop string, so a stop string never reaches the
client, not even in part."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what decoding gives for an incomplete UTF-8 sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the earliest stop string begins in ``text`` (searching from ``start``), or None."""
    found = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (excluding) the earliest stop string, and whether there was one."""
    index = find_stop(text, stops)
    return (text, False) if index is None else (text[:index], True)


class StopScanner:
    """Feeds on text increments; says what may be sent now and whether a stop string was hit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of ``text`` released
        self.stopped = False

    def feed(self, delta: str, *, final: bool = False) -> str:
        """Add ``delta``; return the text that can be released now (nothing more once stopped).
        ``final``: no more text will come, so nothing needs to be held back."""
        if self.stopped:
            return ""
        longest = max((len(s) for s in self.stops), default=0)
        search_from = max(0, len(self.text) - longest + 1)
        self.text += delta
        index = find_stop(self.text, self.stops, search_from)
        if index is not None:
            self.stopped = True
            end = index
        else:
            end = len(self.text) if final else len(self.text) - held_back(self.text, self.stops)
        released, self.sent = self.text[self.sent : end], max(self.sent, end)
        return released


class IncrementalDecoder:
    """Token ids -> text increments whose concatenation is the decoded text of all the ids.

    Decodes a short window of recent tokens (the way vLLM does) rather than everything each time,
    and holds back an increment that ends in an incomplete character until the next token completes
    it. Special tokens (EOS…) give no text."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # the window's context starts here…
        self._read = 0  # …and its already-released part ends here
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return self._emit(after[len(before) :])

    def flush(self) -> str:
        """The rest, once no token will follow (an incomplete character stays as U+FFFD)."""
        full = self._decode(self.ids)
        return self._emit(full[len(self.emitted) :]) if full.startswith(self.emitted) else ""

    def _emit(self, delta: str) -> str:
        self.emitted += delta
        return delta
