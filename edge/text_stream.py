"""The text of a generation, token by token: UTF-8-safe per-token text and stop strings.

Each committed token becomes a `Span` (its id, its provenance and its text). The text of a token is
its bytes run through one incremental UTF-8 decoder per generation, so a character split across
tokens appears whole, on the token that completes it (the ones before it carry ""). Joined, the
spans' texts are exactly the decoded answer.

`StopMatcher` holds back the shortest tail that could still grow into a stop string and cuts the
answer where the earliest stop string begins (the stop string itself is not emitted). It works on
decoded text (str), so it never cuts a UTF-8 character, and it matches across piece and token
boundaries. Tokens are held whole: a token whose text is only partly before the cut is emitted with
that part only, and nothing after the cut is emitted.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Callable, Iterable, Optional


@dataclass
class Span:
    text: str
    token_id: Optional[int] = None    # None: text with no token of its own (the decoder's final flush)
    source: Optional[str] = None      # "draft" | "target" | "edge"


class TokenText:
    """Per-token text of one generation (one incremental UTF-8 decoder)."""

    def __init__(self, detokenize: Callable[[list[int]], bytes]):
        self._detokenize = detokenize
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def spans(self, token_ids: list[int], sources: list[str]) -> list[Span]:
        return [Span(self._decoder.decode(self._detokenize([t])), t, s) for t, s in zip(token_ids, sources)]

    def flush(self) -> list[Span]:
        tail = self._decoder.decode(b"", final=True)
        return [Span(tail)] if tail else []


class StopMatcher:
    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in stops if s]
        self.stopped = False          # a stop string matched: nothing more will be emitted
        self._held: list[Span] = []

    def push(self, spans: list[Span]) -> list[Span]:
        """Take new spans; return those that can be emitted now."""
        if self.stopped:
            return []
        self._held += spans
        if not self.stops:
            out, self._held = self._held, []
            return out
        text = "".join(s.text for s in self._held)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._held = _cut(self._held, min(hits)), []
            return out
        keep = _longest_stop_prefix_suffix(text, self.stops)
        n, end = 0, len(text) - keep
        for i, s in enumerate(self._held):       # emit whole spans that end before the held tail
            if n + len(s.text) > end:
                out, self._held = self._held[:i], self._held[i:]
                return out
            n += len(s.text)
        out, self._held = self._held, []
        return out

    def flush(self) -> list[Span]:
        """The end of the generation: whatever was held back is emitted."""
        out, self._held = ([] if self.stopped else self._held), []
        return out


def _cut(spans: list[Span], at: int) -> list[Span]:
    """The spans covering text[:at]; the span the cut falls in keeps its text before the cut."""
    out, n = [], 0
    for s in spans:
        if n >= at:
            break
        out.append(s if n + len(s.text) <= at else Span(s.text[:at - n], s.token_id, s.source))
        n += len(s.text)
    return out


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
