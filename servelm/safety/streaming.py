"""Incremental output redaction for streamed completions.

Text is emitted only once it is far enough from the end of what the model has produced
that no PII span could still be growing across it: the scanner keeps a *tail window*
of ``window`` characters, and never cuts inside a detected span or inside a word.
So an e-mail address that arrives as ``"jo" "hn@exa" "mple.com"`` leaves the server
only as ``<EMAIL_ADDRESS>``.

    scanner = guard.output_stream(request_id)
    for delta in engine_deltas:
        send(scanner.feed(delta))      # may be "" while text is held back
    send(scanner.finish())
    scanner.blocked                    # True -> end the stream with finish_reason="content_filter"
"""
from __future__ import annotations

from typing import Callable

from servelm.safety.pii import PiiSpan, redact

Detect = Callable[[str], list[PiiSpan]]


class StreamingRedactor:
    """Redacts PII in a stream of text deltas; ``feed`` returns what is safe to emit now.

    ``detect`` maps text to PII spans. ``window`` must exceed the longest PII span
    expected (IBANs with spaces are 42 characters; API keys can be longer: they have no
    spaces, so the word rule holds them back anyway). ``min_step`` batches analysis so
    the detector runs about once per ``min_step`` new characters, not per token.
    """

    def __init__(self, detect: Detect, window: int = 64, min_step: int = 24, max_word: int = 512,
                 on_spans: Callable[[list[PiiSpan]], None] | None = None):
        self.detect = detect
        self.window = window
        self.min_step = min_step
        self.max_word = max_word
        self.on_spans = on_spans
        self._buf = ""
        self._finished = False
        self.spans_found: list[PiiSpan] = []
        self.emitted = ""
        self.blocked = False

    def _cut(self, spans: list[PiiSpan], final: bool) -> int:
        if final:
            return len(self._buf)
        cut = len(self._buf) - self.window
        if cut <= 0:
            return 0
        # Back up to whitespace so a word (or a token-split number) is never split,
        # unless the "word" is absurdly long (binary garbage, base64 blobs).
        ws = max(self._buf.rfind(c, 0, cut) for c in " \n\t")
        if ws >= 0 and cut - ws <= self.max_word:
            cut = ws + 1
        elif ws < 0 and cut <= self.max_word:
            return 0
        for s in spans:  # never split a detected span: move the cut before it
            if s.start < cut < s.end:
                cut = s.start
        return max(cut, 0)

    def _advance(self, final: bool) -> str:
        spans = self.detect(self._buf) if self._buf else []
        cut = self._cut(spans, final)
        if cut <= 0:
            return ""
        head_spans = [s for s in spans if s.end <= cut]
        if head_spans:
            self.spans_found.extend(head_spans)
            if self.on_spans:
                self.on_spans(head_spans)
        out = redact(self._buf[:cut], head_spans)
        self._buf = self._buf[cut:]
        self.emitted += out
        return out

    def feed(self, delta: str) -> str:
        """Add ``delta``; return the redacted text that may be sent now (often ``""``)."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self.blocked or not delta:
            return ""
        self._buf += delta
        if len(self._buf) < self.window + self.min_step:
            return ""
        return self._advance(final=False)

    def finish(self) -> str:
        """Return the rest of the text, redacted; the stream is over."""
        if self._finished:
            return ""
        self._finished = True
        if self.blocked:
            return ""
        return self._advance(final=True)

    def block(self) -> None:
        """Stop emitting: everything still held back is dropped."""
        self.blocked = True
        self._buf = ""
