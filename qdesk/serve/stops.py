"""Stop sequences over streamed text: text is released as soon as it cannot be the start of a stop sequence."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """Feed it the answer's pieces; it gives back what may be shown, and says when a stop sequence has appeared
    (the stop sequence itself, and anything after it, is never shown, as OpenAI's API does)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is now safe to show (maybe ""); after a stop, always ""."""
        if self.stopped:
            return ""
        text = self._held + piece
        if not self._stops:
            self._held = ""
            return text
        found = [position for position in (text.find(stop) for stop in self._stops) if position >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return text[:min(found)]
        keep = self._longest_partial_stop(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> str:
        """What was held back at the end of the answer (it did not become a stop sequence)."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held

    def _longest_partial_stop(self, text: str) -> int:
        """The length of the longest end of `text` that begins some stop sequence."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[len(text) - length:]):
                    longest = length
                    break
        return longest
