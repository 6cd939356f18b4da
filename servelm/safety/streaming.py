"""Incremental output redaction for streamed completions.

A streamed answer should look streamed: each token's text leaves the server as soon as no scanner could
still need it. Text is held back only while it may be the beginning of something a scanner looks for:

* the end of the word still being written, from its last character that cannot be part of an e-mail
  address, a token-shaped key or an IP address (an address or key arrives as ``"jo" "hn@exa" "mple.com"``;
  ``"I'm"`` leaves ``"I'"`` at once and holds ``"m"``, since ``m@example.com`` could follow);
* the longest run that a *hold pattern* can still complete: a number written with spaces or dashes (a
  phone, card or SSN), an IBAN in groups of four, ``password: ...`` before its value, a PEM private key
  before its END line (the ``regex`` package's partial matching tells whether a pattern could still match
  if the text went on);

and never more than ``max_hold`` characters (``max_hold_block`` for a private key block), except that the
last ``min_hold`` characters always wait (a registered output scanner declares how much text it must see
together; ``None`` holds the whole answer to the end). What is released
is scanned with the ``context`` characters sent before it, so a "keyword: value" secret whose keyword left
in an earlier chunk is still found. An e-mail split across tokens therefore leaves only as
``<EMAIL_ADDRESS>``, while ordinary prose goes out one chunk per token, one word behind the model.

    scanner = guard.output_stream(request_id)
    for delta in engine_deltas:
        send(scanner.feed(delta))      # may be "" while text is held back
    send(scanner.finish())
    scanner.blocked                    # True -> end the stream with finish_reason="content_filter"
"""
from __future__ import annotations

from typing import Callable

import regex

from servelm.safety.pii import PiiSpan, redact
from servelm.safety.secrets import KEYWORD

Detect = Callable[[str], list[PiiSpan]]

# Patterns whose partial match at the end of the text holds it back (see the module docstring). They are
# deliberately looser than the detectors: holding a few characters too long costs nothing.
NUMBER_HOLD = r"[+(]?\d[\d \-().\/]*"                     # phones, cards, SSNs, IP addresses
IBAN_HOLD = r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4})* ?"
KEYWORD_HOLD = rf"{KEYWORD}[\"']?\s*[:=]?\s*[\"']?\S*"  # "password: hunter2" until the value is complete
PRIVATE_KEY_HOLD = r"-----BEGIN[^\n]*PRIVATE KEY[\s\S]*?-----END[^\n]*?-----"
# With PERSON on: a run of capitalised words ("George" may go on as "George Washington").
NAME_HOLD = r"[A-Z][\w'\-]*(?:\.? +[A-Z][\w'\-]*)* *"
DEFAULT_HOLDS = (NUMBER_HOLD, IBAN_HOLD, KEYWORD_HOLD, PRIVATE_KEY_HOLD)
# Characters other than letters and digits inside e-mail addresses as people write them, provider keys,
# JWTs, base64 secrets and IPv6 addresses. An apostrophe, "!" or "," ends the held run: RFC 5322 allows some
# of them in an address's local part, but holding them would keep every "I'm" and "Sure!" back a token more
# (the first text of an answer one token later), and a released "o'" of "o'brien@..." discloses nothing.
WORD_CHARS = frozenset("._%+-/=@~:")


def _continues_address(c: str) -> bool:
    """True when an e-mail address, key or IP address written so far could go on after ``c``."""
    # Letters beyond Latin (U+0250 on) end the run: CJK or Thai prose has no spaces, and holding it whole
    # would send it in 256-character bursts; addresses written in those scripts are rare.
    return c in WORD_CHARS or c == "_" or (c.isalnum() and ord(c) < 0x250)


class StreamingRedactor:
    """Redacts PII in a stream of text deltas; ``feed`` returns what is safe to emit now.

    ``detect`` maps text to PII spans. ``holds`` are regular expressions (``regex`` syntax) whose partial
    match at the end of the unsent text keeps it back; the trailing run of characters that an e-mail address,
    a key or an IP address could go on from (``WORD_CHARS``) is always kept back.
    """

    def __init__(self, detect: Detect, holds: tuple[str, ...] = DEFAULT_HOLDS, context: int = 64,
                 max_hold: int = 256, max_hold_block: int = 8192,
                 on_spans: Callable[[list[PiiSpan]], None] | None = None, min_hold: int | None = 0):
        self.detect = detect
        self.holds = [regex.compile(h) for h in holds]
        self.context = context
        self.max_hold = max_hold
        self.max_hold_block = max_hold_block
        self.min_hold = min_hold
        self.on_spans = on_spans
        self._buf = ""
        self._sent_raw = ""  # the last ``context`` characters released, before redaction
        self._finished = False
        self.spans_found: list[PiiSpan] = []
        self.emitted = ""
        self.blocked = False

    def _held_from(self) -> int:
        """Returns the index in the unsent text from which it must wait for more text."""
        buf, n = self._buf, len(self._buf)
        floor = max(0, n - self.max_hold)
        hold = n
        while hold > floor and _continues_address(buf[hold - 1]):
            hold -= 1  # the end of the word being written, which an address or key may go on from
        offset = max(0, n - self.max_hold_block)
        tail = buf[offset:]
        for rx in self.holds:
            for m in rx.finditer(tail, partial=True):
                if m.end() == len(tail) and m.start() < len(tail):
                    # a private key block may be long; anything else goes out after max_hold characters
                    start = offset + m.start()
                    hold = min(hold, start if rx.pattern == PRIVATE_KEY_HOLD else max(start, floor))
                    break
        if self.min_hold is None:
            return 0
        return min(hold, max(0, n - self.min_hold))

    def _advance(self, final: bool) -> str:
        cut = len(self._buf) if final else self._held_from()
        if cut <= 0:
            return ""
        left = self._sent_raw[-self.context:]
        found = self.detect(left + self._buf)
        if self.blocked:  # the detector stopped the stream (a leaked canary)
            return ""
        spans = []
        for s in found:
            a, b = s.start - len(left), s.end - len(left)
            if b > 0:  # spans wholly in the text already sent were handled then
                spans.append(PiiSpan(s.entity, max(a, 0), b, s.score))
        for s in sorted(spans, key=lambda s: s.start):  # never split a detected span: hold all of it
            if s.start < cut < s.end:
                cut = s.start
        if cut <= 0:
            return ""
        head = [s for s in spans if s.end <= cut]
        if head:
            self.spans_found.extend(head)
            if self.on_spans:
                self.on_spans(head)
        if self.blocked:  # on_spans stopped the stream (the policy blocks PII)
            return ""
        out = redact(self._buf[:cut], head)
        self._sent_raw = (self._sent_raw + self._buf[:cut])[-self.context:]
        self._buf = self._buf[cut:]
        self.emitted += out
        return out

    def feed(self, delta: str) -> str:
        """Add ``delta``; return the redacted text that may be sent now (``""`` while all of it is held)."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self.blocked or not delta:
            return ""
        self._buf += delta
        return self._advance(final=False)

    def finish(self) -> str:
        """Return the rest of the text, redacted; the stream is over."""
        if self._finished:
            return ""
        self._finished = True
        if self.blocked or not self._buf:
            return ""
        return self._advance(final=True)

    def block(self) -> None:
        """Stop emitting: everything still held back is dropped."""
        self.blocked = True
        self._buf = ""
