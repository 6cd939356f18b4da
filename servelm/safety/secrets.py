"""Patterns for credentials that must not pass through the server (input or output)."""
from __future__ import annotations

import re

# Provider-issued key formats with fixed prefixes: precise, so one hit is enough.
SECRET_PATTERNS: dict[str, str] = {
    "openai_key": r"\bsk-(?:proj-|svcacct-)?[A-Za-z0-9_\-]{20,}",
    "anthropic_key": r"\bsk-ant-[A-Za-z0-9_\-]{20,}",
    "aws_access_key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "github_token": r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}",
    "slack_token": r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",
    "google_api_key": r"\bAIza[0-9A-Za-z_\-]{35}\b",
    "stripe_key": r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",
    "jwt": r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
    "private_key": r"-----BEGIN (?:RSA |EC |OPENSSH |DSA |PGP )?PRIVATE KEY(?: BLOCK)?-----",
    "hf_token": r"\bhf_[A-Za-z0-9]{30,}\b",
}
SECRET_RE = re.compile("|".join(f"(?P<{k}>{v})" for k, v in SECRET_PATTERNS.items()))


def find_secrets(text: str) -> list[tuple[str, int, int]]:
    """Return ``(kind, start, end)`` for every credential-looking span in ``text``."""
    return [(m.lastgroup or "secret", m.start(), m.end()) for m in SECRET_RE.finditer(text)]
