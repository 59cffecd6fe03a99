"""Text handling for streamed generation: Tibetan syllables, UTF-8 reassembly, stop strings.

A Tibetan character is 3 bytes in UTF-8 and llama.cpp's byte-fallback tokens can split it, so a
token's bytes are not always text. ``Utf8Stream`` buffers an incomplete sequence until it
completes; a sequence that can never complete becomes U+FFFD instead of an exception.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable

# A syllable is a maximal run of Tibetan letters, subjoined letters and vowel signs (U+0F40-U+0FBC);
# the tsheg (U+0F0B), shad (U+0F0D) and spaces separate syllables.
TIBETAN_SYLLABLE = re.compile("[\u0f40-\u0fbc]+")
TIBETAN_CHAR = re.compile("[\u0f00-\u0fff]")


def count_syllables(text: str) -> int:
    """Number of Tibetan syllables (maximal runs of U+0F40-U+0FBC) in ``text``."""
    return sum(1 for _ in TIBETAN_SYLLABLE.finditer(text))


def longest_phrase_run(text: str, min_syllables: int = 3) -> tuple[int, str]:
    """How many times in a row the most repeated phrase of at least ``min_syllables`` Tibetan syllables occurs,
    and that phrase ((1, "") when nothing repeats): "ཀ་ཁ་ག་ཀ་ཁ་ག་ཀ་ཁ་ག" gives (3, "ཀ་ཁ་ག"). Loops show as runs."""
    syl = TIBETAN_SYLLABLE.findall(text)
    best, phrase = 1, ""
    for size in range(min_syllables, len(syl) // 2 + 1):
        for i in range(len(syl) - 2 * size + 1):
            k = 1
            while syl[i + k * size : i + (k + 1) * size] == syl[i : i + size]:
                k += 1
            if k > best:
                best, phrase = k, "་".join(syl[i : i + size])
    return best, phrase


def distinct_bigram_share(ids: list[int]) -> float:
    """Distinct token bigrams over all bigrams (1.0 for fewer than two tokens): low values mean loops."""
    pairs = list(zip(ids, ids[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def tibetan_share(text: str) -> float:
    """Share of the non-space characters of ``text`` that are in the Tibetan block (0 for empty text)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(1 for c in chars if TIBETAN_CHAR.match(c)) / len(chars)


class Utf8Stream:
    """Incremental UTF-8 decoder for token bytes.

    ``feed`` returns only complete characters; the bytes of a character split across tokens wait
    for the rest. Bytes that can never form a character (invalid, or cut off at ``finish``) come out
    as one U+FFFD each instead of raising.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data, final=False)

    def finish(self) -> str:
        """Flush the end of the stream: an incomplete sequence left over becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)

    @property
    def pending(self) -> bytes:
        """Bytes held back because they start a character that has not completed yet."""
        return self._decoder.getstate()[0]


class StopMatcher:
    """Finds stop strings in streamed text without showing a stop string's first part.

    ``feed`` returns the text that is safe to show now: text that could still be the start of a stop
    string is held back until it either completes the stop string (``stopped`` becomes True and the
    stop string is dropped) or cannot any more.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = 0  # longest suffix of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        """The text held back at the end of generation (it completed no stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class CompletionText:
    """A completion's token bytes turned into the text to show: UTF-8 reassembled across tokens (``Utf8Stream``) and
    cut before the first stop string (``StopMatcher``). The chat, ``generate`` and the server all stream through it.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self._utf8 = Utf8Stream()
        self._matcher = StopMatcher(stops)
        self._parts: list[str] = []

    def feed(self, data: bytes) -> str:
        """The text that is safe to show after these bytes (may be empty)."""
        text = self._matcher.feed(self._utf8.feed(data))
        if text:
            self._parts.append(text)
        return text

    @property
    def stopped(self) -> bool:
        """A stop string has appeared: nothing after it is shown."""
        return self._matcher.stopped

    def finish(self) -> str:
        """What was held back at the end (a cut-off character becomes U+FFFD)."""
        tail = self._matcher.feed(self._utf8.finish()) + self._matcher.finish()
        if tail:
            self._parts.append(tail)
        return tail

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return "".join(self._parts)
