"""Patterns for credentials that must not pass through the server (input or output).

Written for the ``regex`` package (Presidio's, which runs them for output redaction), whose variable-width
look-behind lets a "keyword: value" pattern cover only the value, so "db password: <API_KEY>" keeps its label.
"""
from __future__ import annotations

import regex as re

# The value after a credential keyword ("password: ...", "client_secret=..."): not a code reference
# (os.environ[...], settings.KEY, getenv(...)), a ${VAR}/<placeholder>, or a common filler word.
KEYWORD = (r"\b(?:password|passwd|pwd|passphrase|secret|client[_\-]?secret|secret[_\-]?key|api[_\-]?key|"
            r"access[_\-]?token|auth[_\-]?token|bearer[_\-]?token)\b")
_VALUE = (r"(?![A-Za-z_]\w*(?:\.\w|\(|\[))(?![$<{*x]{2}|\$\{|<)(?!(?:none|null|true|false|changeme|required|"
          r"optional|string|redacted|hidden)\b)[^\s\"'`,;()\[\]{}<>]{6,}")

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
    "gitlab_token": r"\bgl(?:pat|ptt|dt|rt|cbt|soat|ffct)-[A-Za-z0-9_\-]{20,}",
    # The whole PEM block: through its END line, or (cut off) through the base64 lines that follow the header.
    "private_key": (r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]{0,16384}?-----END (?:[A-Z0-9]+ )*"
                    r"PRIVATE KEY(?: BLOCK)?-----|(?:\s*[A-Za-z0-9+/=:\-]{16,})*)"),
    # 40 base64 characters after an AWS secret keyword (aws_secret_access_key = ..., "AWS secret: ...") or
    # after the access key id it pairs with ("AKIA... / wJalr...").
    "aws_secret_key": (r"(?:(?<=\baws[_\-\s]?(?:secret[_\-\s]?(?:access[_\-\s]?)?key|secret)[\"']?\s*[:=]?\s*[\"']?)"
                       r"|(?<=\b(?:AKIA|ASIA)[0-9A-Z]{16}[\"']?[\s:/,;|]{1,5}[\"']?))"  # or right after its key id
                       r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),
    "keyword_secret": rf"(?<={KEYWORD}[\"']?\s*[:=]\s*[\"']?){_VALUE}",
    "hf_token": r"\bhf_[A-Za-z0-9]{30,}\b",
}
SECRET_RE = re.compile("|".join(f"(?P<{k}>{v})" for k, v in SECRET_PATTERNS.items()))


def find_secrets(text: str) -> list[tuple[str, int, int]]:
    """Return ``(kind, start, end)`` for every credential-looking span in ``text``."""
    return [(m.lastgroup or "secret", m.start(), m.end()) for m in SECRET_RE.finditer(text)]
