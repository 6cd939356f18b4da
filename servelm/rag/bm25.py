"""Lexical retrieval with BM25 (the ``bm25s`` library), one in-memory index per collection."""
from __future__ import annotations

import re

import numpy as np

# A token with a digit in it: an error code, an id, a version, a part number. The embedder splits
# such tokens into meaningless word pieces, so only an exact match can find them.
_CODE = re.compile(r"\d")


class BM25Index:
    """BM25 over chunk texts; ``search`` returns ``(chunk_id, score)`` pairs, best first."""

    def __init__(self, ids: list[int], texts: list[str]):
        import bm25s

        self.ids = np.array(ids, np.int64)
        self.pos = {int(i): n for n, i in enumerate(ids)}
        self.model = None
        if ids:
            self.model = bm25s.BM25()
            self.model.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def search(self, query: str, k: int, allowed: set[int] | None = None) -> list[tuple[int, float]]:
        """Return up to ``k`` best chunks for ``query`` among ``allowed`` ids (all if None)."""
        import bm25s

        if self.model is None:
            return []
        terms = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        vocab = self.model.vocab_dict
        if not any(t in vocab for t in terms):
            return []  # no query word occurs in the collection
        scores = self.model.get_scores(terms)
        if allowed is not None:
            keep = np.zeros(len(self.ids), bool)
            keep[[self.pos[i] for i in allowed if i in self.pos]] = True
            scores = np.where(keep, scores, 0)
        # Select among the matching chunks only: bm25s' own top-k runs argpartition over every
        # chunk, and with ~all scores 0 that took ~29 ms at 100k chunks (measured, docs/rag.md).
        nz = np.flatnonzero(scores)
        if len(nz) > k:
            nz = nz[np.argpartition(-scores[nz], k - 1)[:k]]
        order = nz[np.argsort(-scores[nz], kind="stable")]
        return [(int(self.ids[d]), float(scores[d])) for d in order]

    def exact_matches(self, query: str, max_chunks: int, allowed: set[int] | None = None) -> list[int]:
        """Return the ids of the chunks holding a code-like query token (one with a digit, e.g.
        ``E1234`` or ``zq0123marker``) that occurs in at most ``max_chunks`` chunks, best BM25 first;
        tokens more common than that are left to the ranking."""
        import bm25s

        if self.model is None:
            return []
        terms = [t for t in bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
                 if _CODE.search(t) and t in self.model.vocab_dict]
        out: dict[int, float] = {}
        for t in terms:
            scores = self.model.get_scores([t])
            nz = np.flatnonzero(scores)
            if allowed is not None:
                nz = nz[np.isin(self.ids[nz], np.fromiter(allowed, np.int64, len(allowed)))]
            if 0 < len(nz) <= max_chunks:
                for d in nz:
                    out[int(self.ids[d])] = out.get(int(self.ids[d]), 0.0) + float(scores[d])
        return [i for i, _ in sorted(out.items(), key=lambda x: -x[1])]
