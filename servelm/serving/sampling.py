"""How a request's sampling fields become the engine's: the rules every protocol shares."""
from __future__ import annotations


def fold_seed(seed: int | None) -> int | None:
    """Returns ``seed`` folded to 32 bits (None stays None).

    Any int64 seed is accepted (OpenAI's range); the engine derives per-choice generator seeds from it,
    which must stay inside torch's 64-bit seed range. Folding is deterministic, so equal seeds still give
    equal samples."""
    return None if seed is None else seed & 0xFFFFFFFF


def clamp_top_k(top_k: int, vocab_size: int | None) -> int:
    """Returns ``top_k`` for the engine: at or above the vocabulary it keeps every token, the same as none (0)."""
    return 0 if vocab_size and top_k >= vocab_size else top_k
