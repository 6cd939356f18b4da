"""Recursive splitter counted in the embedding model's tokens, with honest overlap.

The text is tokenized once (with character offsets), then cut recursively at the
coarsest separator that makes every piece small enough: paragraphs, lines, sentences,
words, and as a last resort token boundaries. Pieces are packed greedily into chunks of
at most ``chunk_size`` tokens. Each chunk after the first *starts* ``chunk_overlap``
tokens before the end of the previous one (moved back to the start of a word), so the
overlap holds between every consecutive pair, including a short last chunk; LangChain's
splitter drops it whenever a split is shorter than the chunk size (langchain#8142).
Pieces are capped at ``chunk_size - chunk_overlap - slack`` tokens, which is what makes
that always fit.
"""
from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass

DEFAULT_SEPARATORS = (r"\n[ \t\r\f\v]*\n\s*", r"\n\s*", r"(?<=[.!?…])[\"')\]]*\s+", r"\s+")


@dataclass(slots=True)
class Chunk:
    """A piece of a document: ``text == document_text[start:end]``."""

    text: str
    start: int
    end: int
    page: int | None = None
    source: str = ""


class Splitter:
    """Splits text into :class:`Chunk` s of at most ``chunk_size`` tokens of ``tokenizer``.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (the embedding model's ``tokenizer.json``).
    """

    def __init__(self, tokenizer, chunk_size: int = 500, chunk_overlap: int = 50,
                 separators: tuple[str, ...] = DEFAULT_SEPARATORS):
        if chunk_size < 8 or not 0 <= chunk_overlap <= chunk_size // 2:
            raise ValueError(f"need chunk_size >= 8 and 0 <= chunk_overlap <= chunk_size/2, got {chunk_size}/{chunk_overlap}")
        self.tok = tokenizer
        self.tok.no_truncation()
        self.tok.no_padding()
        self.chunk_size, self.overlap = chunk_size, chunk_overlap
        # Room to move an overlap start back to the beginning of a word.
        self.slack = min(8, (chunk_size - chunk_overlap) // 4)
        self.piece_max = chunk_size - chunk_overlap - self.slack
        self.seps = [re.compile(s) for s in separators]

    def count(self, text: str) -> int:
        """Return the number of tokens in ``text`` (no special tokens)."""
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def split(self, text: str, base: int = 0, page: int | None = None, source: str = "") -> list[Chunk]:
        """Return the chunks of ``text`` in order; offsets are shifted by ``base``."""
        enc = self.tok.encode(text, add_special_tokens=False)
        self._text = text
        self._starts = [s for s, e in enc.offsets]
        self._ends = [e for s, e in enc.offsets]
        if not self._starts:
            return []
        pieces = self._pieces(0, len(text), 0)
        spans = self._pack(pieces)
        out = []
        for a, b in spans:
            # Trim surrounding whitespace; it holds no tokens, so counts do not change.
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
            if a < b:
                out.append(Chunk(text[a:b], base + a, base + b, page, source))
        return out

    def _ntok(self, a: int, b: int) -> int:
        return bisect_left(self._starts, b) - bisect_left(self._starts, a)

    def _pieces(self, a: int, b: int, level: int) -> list[tuple[int, int]]:
        if self._ntok(a, b) <= self.piece_max:
            return [(a, b)]
        if level == len(self.seps):
            return self._token_cut(a, b)
        cuts = [m.end() for m in self.seps[level].finditer(self._text, a, b) if a < m.end() < b]
        if not cuts:
            return self._pieces(a, b, level + 1)
        out, prev = [], a
        for c in cuts + [b]:
            out += self._pieces(prev, c, level + 1)
            prev = c
        return out

    def _token_cut(self, a: int, b: int) -> list[tuple[int, int]]:
        i0, i1 = bisect_left(self._starts, a), bisect_left(self._starts, b)
        bounds = [a] + [self._starts[i] for i in range(i0 + self.piece_max, i1, self.piece_max)] + [b]
        return list(zip(bounds[:-1], bounds[1:]))

    def _pack(self, pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
        spans, i, start = [], 0, pieces[0][0]
        while i < len(pieces):
            end = pieces[i][1]
            i += 1
            while i < len(pieces) and self._ntok(start, pieces[i][1]) <= self.chunk_size:
                end = pieces[i][1]
                i += 1
            if i < len(pieces) and self._ntok(end, pieces[-1][1]) == 0:
                end, i = pieces[-1][1], len(pieces)  # only whitespace is left
            spans.append((start, end))
            if i < len(pieces):
                start = self._overlap_start(end) if self.overlap else end
        return spans

    def _overlap_start(self, end: int) -> int:
        """Return where the next chunk starts: ``overlap`` tokens before ``end``, at a word start."""
        j = bisect_left(self._starts, end)
        t = j - self.overlap
        s, text = self._starts, self._text
        for u in range(t, max(t - self.slack, 0) - 1, -1):
            if u == 0 or not (s[u] == self._ends[u - 1] and text[s[u] - 1].isalnum() and text[s[u]].isalnum()):
                return s[u]
        return s[t]  # a word longer than the slack: overlap starts inside it


def load_tokenizer(model_dir: str):
    """Return the ``tokenizers.Tokenizer`` of a sentence-transformers model directory.

    Raises FileNotFoundError naming the missing ``tokenizer.json``.
    """
    import os

    from tokenizers import Tokenizer

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the embedding model needs a fast tokenizer (tokenizer.json)")
    return Tokenizer.from_file(path)
