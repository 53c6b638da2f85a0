"""Generated tokens to streamed text: incremental detokenization and stop strings.

Decoding one token at a time breaks multi-byte characters and words that merge across tokens, so (as vLLM
and TGI do) each step decodes a short window of recent tokens twice and emits only the new, complete text.
Text that could be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.prefix_offset = 0     # window start: decoding from here gives the context for the next piece
        self.read_offset = 0       # tokens already turned into text
        self.text = ""             # all complete text so far (emitted + held back)
        self.emitted = 0           # characters of self.text already sent
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Add one generated token; returns the text that is now safe to send (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        for s in self.stop:
            at = self.text.find(s)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        end = len(self.text)
        if not self.stopped:
            end -= self._held_back()
        end = max(end, self.emitted)
        piece = self.text[self.emitted:end]
        self.emitted = end
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that could begin a stop string."""
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def finish(self) -> str:
        """At the end of generation: whatever was held back (and is not a stop string) is sent."""
        if not self.stopped:
            rest = self._decode(self.ids[self.prefix_offset:])
            done = self._decode(self.ids[self.prefix_offset:self.read_offset])
            if len(rest) > len(done):
                self.text += rest[len(done):]
                self.read_offset = len(self.ids)
            for s in self.stop:
                at = self.text.find(s)
                if at != -1:
                    self.text, self.stopped = self.text[:at], True
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece
