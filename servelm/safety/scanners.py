"""The individual input and output scanners.

Every scanner is a function ``(text, ctx) -> ScanResult`` with a 0..1 ``score``; the
:class:`~servelm.safety.guard.Guard` compares it with the policy's threshold and applies
the policy's action. Scanners may raise; the guard turns that into fail-open/closed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from servelm.safety.classifier import load_classifier
from servelm.safety.normalise import Normalised
from servelm.safety.pii import DEFAULT_ENTITIES, PiiSpan, get_pii_detector, not_supplied, redact
from servelm.safety.rules import match_rules
from servelm.safety.secrets import find_secrets


@dataclass(slots=True)
class ScanContext:
    """What scanners may need besides the text."""

    normalised: Normalised | None = None
    max_input_chars: int = 32_000
    threshold: float = 0.5
    entities: tuple[str, ...] = DEFAULT_ENTITIES
    canary: str = ""
    system_prompt: str = ""
    supplied: str = ""  # the caller's own text: PII it already holds is not redacted from the answer


@dataclass(slots=True)
class ScanResult:
    score: float
    reason: str = ""
    redacted: str | None = None  # the text with findings masked, for action "redact"
    spans: list[PiiSpan] = field(default_factory=list)
    model_threshold: float | None = None  # a learned scanner's own calibrated threshold


def scan_length(text: str, ctx: ScanContext) -> ScanResult:
    """Score 1 when the text is over the policy's ``max_input_chars``."""
    n = len(text)
    if n > ctx.max_input_chars:
        return ScanResult(1.0, f"input is {n} characters; the limit is {ctx.max_input_chars}")
    return ScanResult(0.0)


def scan_injection_rules(text: str, ctx: ScanContext) -> ScanResult:
    """Score 1 when a hand-written injection/jailbreak rule matches any normalised view."""
    hits = match_rules(ctx.normalised.all_views())
    if not hits:
        return ScanResult(0.0)
    found = ", ".join(h.rule for h in hits)
    extra = f" (after decoding: {', '.join(ctx.normalised.findings)})" if ctx.normalised.findings else ""
    return ScanResult(1.0, f"matched {found}: {hits[0].excerpt!r}{extra}")


def scan_prompt_injection(text: str, ctx: ScanContext) -> ScanResult:
    """Score = the learned injection classifier's probability, max over decoded views."""
    clf = load_classifier("injection")
    views = ctx.normalised.all_views(with_rot13=False)
    score = max(clf.score(v) for v in views if v.strip()) if any(v.strip() for v in views) else 0.0
    return ScanResult(score, f"injection classifier score {score:.2f}", model_threshold=clf.threshold)


def scan_secrets(text: str, ctx: ScanContext) -> ScanResult:
    """Score 1 when the text carries a credential (API key, token, private key)."""
    found = find_secrets(text)
    if not found:
        return ScanResult(0.0)
    spans = [PiiSpan("API_KEY", s, e, 1.0) for _, s, e in found]
    kinds = sorted({k for k, _, _ in found})
    return ScanResult(1.0, f"credential in input: {', '.join(kinds)}", redacted=redact(text, spans), spans=spans)


def _harmful(text: str, ctx: ScanContext) -> ScanResult:
    clf = load_classifier("harmful")
    score = clf.score(text) if text.strip() else 0.0
    return ScanResult(score, f"harmful-content classifier score {score:.2f}", model_threshold=clf.threshold)


scan_harmful_input = _harmful
scan_harmful_output = _harmful


def scan_pii(text: str, ctx: ScanContext) -> ScanResult:
    """Score = the highest PII confidence; ``redacted`` masks every span as ``<ENTITY>``."""
    spans = not_supplied(text, get_pii_detector().detect(text, ctx.entities, threshold=ctx.threshold), ctx.supplied)
    if not spans:
        return ScanResult(0.0)
    kinds = sorted({s.entity for s in spans})
    return ScanResult(max(s.score for s in spans), f"PII: {', '.join(kinds)}", redacted=redact(text, spans),
                      spans=spans)


_WORD = re.compile(r"\w+")


def _shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1))}


def scan_system_prompt_leak(text: str, ctx: ScanContext) -> ScanResult:
    """Score 1 when the canary appears, else the share of the system prompt's 8-word runs echoed."""
    if ctx.canary and ctx.canary.lower() in text.lower().replace("\u200b", ""):
        return ScanResult(1.0, "canary token from the system prompt appeared in the output")
    if ctx.system_prompt:
        sys_sh = _shingles(ctx.system_prompt)
        if sys_sh:
            share = len(sys_sh & _shingles(text)) / len(sys_sh)
            return ScanResult(share, f"{share:.0%} of the system prompt echoed")
    return ScanResult(0.0)


INPUT_SCANNERS = {
    "length": scan_length,
    "injection_rules": scan_injection_rules,
    "prompt_injection": scan_prompt_injection,
    "secrets": scan_secrets,
    "harmful_input": scan_harmful_input,
}
OUTPUT_SCANNERS = {
    "system_prompt_leak": scan_system_prompt_leak,
    "pii": scan_pii,
    "harmful_output": scan_harmful_output,
}
