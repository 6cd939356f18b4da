"""Normalise text before scanning, so obfuscation does not hide an attack.

Produces the canonical text (invisible characters removed, NFKC, look-alike letters
folded to Latin) plus *decoded views*: base64 / hex runs decoded, and a rot13 view.
Scanners look at every view; the model still receives the original text.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from dataclasses import dataclass, field

# Unicode's full confusables skeleton (UTS #39) has no maintained, dependency-free Python
# package here; attacks in practice use Cyrillic/Greek look-alikes of Latin letters, which
# this table covers. NFKC already folds fullwidth and mathematical alphanumerics.
_CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "і": "i", "ј": "j", "к": "k",
    "ӏ": "l", "м": "m", "п": "n", "о": "o", "р": "p", "ԛ": "q", "г": "r", "ѕ": "s", "т": "t",
    "у": "y", "х": "x", "ԝ": "w", "ү": "y", "ɡ": "g",
    "А": "A", "В": "B", "С": "C", "Е": "E", "Н": "H", "І": "I", "Ј": "J", "К": "K", "М": "M",
    "О": "O", "Р": "P", "Ѕ": "S", "Т": "T", "Х": "X", "У": "Y",
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "ι": "i", "κ": "k", "τ": "t", "υ": "u", "ε": "e",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
})
# Zero-width and bidi controls, soft hyphen, variation selectors, Unicode tag characters.
_INVISIBLE_RE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f]"
)
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_LEET_WORD = re.compile(r"\b(?=\w*[a-z])(?=\w*[013457])[a-z0-9@$!]{3,}\b", re.IGNORECASE)
_B64_RE = re.compile(r"(?:[A-Za-z0-9+/]{4}){4,}(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_HEX_RE = re.compile(r"\b(?:[0-9a-fA-F]{2}[\s:]?){8,}")
MAX_DECODED_VIEWS = 8


@dataclass(slots=True)
class Normalised:
    """The canonical text, extra decoded views, and what obfuscation was found."""

    text: str
    views: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    rot13: str = ""
    leet: str = ""  # digits/symbols read as letters ("1gn0r3" -> "ignore"), when any were found

    def all_views(self, with_rot13: bool = True) -> list[str]:
        """Return the canonical text, every decoded view and (optionally) the rot13 and leet views.

        Learned models should skip the rot13/leet views: on ordinary text they are
        gibberish the models were not trained on; exact-phrase rules can use them safely.
        """
        extra = [v for v in (self.rot13, self.leet) if v] if with_rot13 else []
        return [self.text, *self.views, *extra]


def _printable(s: str) -> bool:
    return bool(s) and sum(c.isprintable() or c in "\n\t" for c in s) >= 0.9 * len(s) and any(c.isalpha() for c in s)


def strip_invisible(text: str) -> str:
    """Return ``text`` without zero-width, bidi-control and tag characters."""
    return _INVISIBLE_RE.sub("", text)


def _smuggled_tags(text: str) -> str:
    # Tag characters (U+E0020..E007E) mirror ASCII and render as nothing: "ASCII
    # smuggling" hides whole instructions in them, so decode them into a view.
    return "".join(chr(ord(c) - 0xE0000) for c in text if 0xE0020 <= ord(c) <= 0xE007E)


def fold(text: str) -> str:
    """Return ``text`` after NFKC and look-alike folding (Cyrillic/Greek letters → Latin)."""
    return unicodedata.normalize("NFKC", text).translate(_CONFUSABLES)


def _decode_b64(run: str) -> str | None:
    try:
        raw = base64.b64decode(run + "=" * (-len(run) % 4), validate=False)
        s = raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return s if _printable(s) else None


def _decode_hex(run: str) -> str | None:
    try:
        s = bytes.fromhex(re.sub(r"[\s:]", "", run)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return s if _printable(s) else None


def normalise(text: str, max_chars: int = 200_000) -> Normalised:
    """Return the :class:`Normalised` form of ``text``; never raises on any ``str``.

    Input longer than ``max_chars`` is scanned on its first ``max_chars`` characters
    (the length scanner rejects such input separately).
    """
    if not isinstance(text, str):
        text = str(text)
    text = text[:max_chars]
    findings: list[str] = []
    views: list[str] = []
    smuggled = _smuggled_tags(text)
    if smuggled:
        findings.append("tag_characters")
        views.append(smuggled)
    clean = strip_invisible(text)
    if len(clean) != len(text):
        findings.append("invisible_characters")
    # Drop control characters other than whitespace (binary garbage).
    clean = "".join(c for c in clean if c.isprintable() or c in "\n\r\t")
    folded = fold(clean)
    if folded != unicodedata.normalize("NFKC", clean):
        findings.append("homoglyphs")
    for m in _B64_RE.finditer(folded):
        if len(views) >= MAX_DECODED_VIEWS:
            break
        dec = _decode_b64(m.group(0))
        if dec:
            findings.append("base64")
            views.append(fold(dec))
    for m in _HEX_RE.finditer(folded):
        if len(views) >= MAX_DECODED_VIEWS:
            break
        dec = _decode_hex(m.group(0))
        if dec:
            findings.append("hex")
            views.append(fold(dec))
    # rot13 is cheap and self-inverse: scanning its view catches "vtaber nyy cerivbhf".
    leet = ""
    if _LEET_WORD.search(folded):
        leet = _LEET_WORD.sub(lambda m: m.group(0).translate(_LEET), folded)
    return Normalised(text=folded, views=views, findings=sorted(set(findings)),
                      rot13=codecs.encode(folded, "rot13"), leet=leet)
