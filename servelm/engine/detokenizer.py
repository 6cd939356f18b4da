"""Incremental detokenization: text grows token by token without ever emitting broken UTF-8.

A token can end in the middle of a multi-byte character (the tokenizer then decodes a
``U+FFFD``); such text is held back until the next tokens complete it. Decoding a short
window that starts a few tokens back keeps leading spaces and merges right.
"""
from __future__ import annotations

from servelm.engine.sequence import Sequence
from servelm.engine.tokenizer import Tokenizer


def detokenize_new_text(tok: Tokenizer, seq: Sequence) -> str:
    """Return the text that the tokens since ``seq.read_offset`` add, advancing the offsets."""
    ids = seq.token_ids
    skip = seq.params.skip_special_tokens
    prefix_text = tok.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
    full_text = tok.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        return full_text[len(prefix_text):]
    return ""


def stop_string_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def find_stop_string(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Find the earliest stop string that ends in the last ``new_len`` characters of ``text``.

    Returns ``(position, stop string)`` or ``None``.
    """
    found = None
    for s in stops:
        start = max(0, len(text) - new_len - len(s) + 1)
        pos = text.find(s, start)
        if pos != -1 and (found is None or pos < found[0]):
            found = (pos, s)
    return found
