"""PII spans, redaction and the process-wide detector, without importing Presidio.

The detector itself (:mod:`servelm.safety.pii_analyzer`: Presidio with spaCy ``en_core_web_sm`` and
checksum-validated recognisers) is imported on the first :func:`get_pii_detector` call, so importing the
guard (and ``servelm serve`` with PII filtering off or ``--no-guard``) never pays for Presidio and spaCy.
Redaction replaces each span with ``<ENTITY_TYPE>`` (e.g. ``<EMAIL_ADDRESS>``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# What the pii scanner redacts unless a policy lists its own entities: credentials (API_KEY: provider keys,
# tokens, "password: ..." values, private keys) and identifiers whose disclosure harms their owner. Names,
# places, organisations and dates are the substance of ordinary answers ("the first president was George
# Washington"): a policy opts in to PERSON (spaCy NER) or IP_ADDRESS by listing them.
DEFAULT_ENTITIES = ("API_KEY", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "EMAIL_ADDRESS", "PHONE_NUMBER")
# Every entity a policy may list.
KNOWN_ENTITIES = (*DEFAULT_ENTITIES, "IP_ADDRESS", "PERSON")


@dataclass(slots=True)
class PiiSpan:
    entity: str
    start: int
    end: int
    score: float


def redact(text: str, spans: list[PiiSpan]) -> str:
    """Return ``text`` with each span replaced by ``<ENTITY_TYPE>``."""
    out, last = [], 0
    for s in sorted(spans, key=lambda s: s.start):
        out.append(text[last:s.start])
        out.append(f"<{s.entity}>")
        last = s.end
    out.append(text[last:])
    return "".join(out)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def not_supplied(text: str, spans: list[PiiSpan], supplied: str) -> list[PiiSpan]:
    """Returns the ``spans`` of ``text`` whose value is not in ``supplied`` (the caller's own messages).

    Repeating what the caller wrote discloses nothing to the caller: "Bob is 30" -> ``{"name": "Bob"}``, a
    letter addressed to the e-mail the user gave. Only values found whole (at word boundaries) count;
    retrieved documents are never "supplied", so their PII stays redacted."""
    if not supplied or not spans:
        return spans
    have = _norm(supplied)
    return [s for s in spans if not re.search(rf"(?<!\w){re.escape(_norm(text[s.start:s.end]))}(?!\w)", have)]


@lru_cache(maxsize=1)
def get_pii_detector():
    """Return the process-wide :class:`~servelm.safety.pii_analyzer.PiiDetector` (imports Presidio and
    loads spaCy once, a few seconds)."""
    from servelm.safety.pii_analyzer import PiiDetector

    return PiiDetector()
