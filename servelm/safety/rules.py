"""Hand-written rules for prompt injection and jailbreaks: fast, explainable, high precision.

Each rule is a named regular expression over the normalised text (and its decoded
views). Rules are the first layer; the learned classifier catches paraphrases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_IGNORE = r"(?:ignore|disregard|forget|skip|override|bypass|drop|abandon|discard|overlook|neglect)"
_PREV = r"(?:all\s+|any\s+|the\s+|your\s+|my\s+|these\s+|those\s+|of\s+)*(?:previous|prior|above|earlier|preceding|former|original|initial|system|existing|old|foregoing)"
_INSTR = r"(?:instructions?|prompts?|rules?|directions?|guidelines?|directives?|commands?|context|messages?|constraints?|programming|orders?|text|restrictions?)"

RULES: dict[str, str] = {
    # "Ignore all previous instructions", "disregard the above rules", ...
    "ignore_previous": rf"\b{_IGNORE}\b[^.\n]{{0,30}}?\b{_PREV}\b[^.\n]{{0,20}}?\b{_INSTR}\b",
    "ignore_everything": rf"\b{_IGNORE}\s+(?:everything|all(?:\s+of\s+it)?|anything)\s+(?:above|before|previously|you\s+(?:were|have\s+been)\s+told)",
    "new_instructions": r"\b(?:new|updated|real|actual|important)\s+(?:system\s+)?instructions?\s*(?:[:\-]|\*\*\*|are\b|follow)",
    "fake_system_turn": r"(?:^|\n)\s*(?:\[\s*system\s*\]|<\|?\s*(?:im_start|system)\s*\|?>|###\s*system|system\s*(?:override|message|prompt)\s*:)",
    "dan_persona": r"\b(?:DAN|STAN|DUDE|AIM|AntiDAN|BetterDAN)\b[^\n]{0,80}\b(?:do\s+anything\s+now|strive\s+to\s+avoid\s+norms|no\s+(?:rules|restrictions|limits|filters?))|\bdo\s+anything\s+now\b",
    "no_restrictions_mode": r"\b(?:developer|god|jailbreak|unrestricted|unfiltered|evil|admin|debug|sudo)\s+mode\b|\bjailbr(?:eak|oken)\b",
    "no_rules_persona": r"\b(?:you\s+are|act\s+as|pretend\s+(?:to\s+be|you\s+are)|roleplay\s+as|from\s+now\s+on[, ]+you)\b[^.\n]{0,80}\b(?:no|without|free\s+(?:of|from))\s+(?:any\s+)?(?:rules|restrictions|limits|limitations|filters?|censorship|guidelines|ethics|morals|content\s+polic(?:y|ies))",
    "reveal_system_prompt": r"\b(?:reveal|show|print|repeat|output|display|tell\s+me|give\s+me|leak|dump|what\s+(?:is|are|were))\b[^.\n]{0,40}\b(?:system\s+prompt|initial\s+(?:prompt|instructions)|hidden\s+(?:prompt|instructions)|instructions\s+(?:you\s+were\s+given|above)|your\s+(?:instructions|prompt|rules))",
    "stay_in_character": r"\b(?:stay|remain)\s+in\s+character\b|\bbroke\s+character\b",
    "policy_evasion": r"\b(?:ignore|bypass|disable|turn\s+off|without)\s+(?:your\s+|the\s+|all\s+|any\s+)*(?:safety|content|ethical|moral)\s+(?:filters?|guidelines|polic(?:y|ies)|restrictions|rules|training)",
    "exfiltrate": r"\b(?:send|forward|post|upload|exfiltrate|email)\b[^.\n]{0,60}\b(?:api\s+keys?|credentials|passwords?|secrets?|tokens?|environment\s+variables|customer\s+(?:data|database|emails))\b[^.\n]{0,40}\b(?:to|at)\b",
    "markdown_exfil": r"!\[[^\]]*\]\(https?://[^)\s]*[?&][^)\s]*=",
}
_COMPILED = {name: re.compile(rx, re.IGNORECASE) for name, rx in RULES.items()}


@dataclass(slots=True)
class RuleMatch:
    """A rule that fired, with the matched text (truncated for logs)."""

    rule: str
    excerpt: str


def match_rules(views: list[str]) -> list[RuleMatch]:
    """Return every rule that matches any of ``views`` (each rule at most once)."""
    found: list[RuleMatch] = []
    for name, rx in _COMPILED.items():
        for v in views:
            m = rx.search(v)
            if m:
                found.append(RuleMatch(name, m.group(0)[:80]))
                break
    return found
