"""Lexical retrieval with BM25 (the ``bm25s`` library), one in-memory index per collection."""
from __future__ import annotations

import numpy as np


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
        mask = None
        if allowed is not None:
            mask = np.zeros(len(self.ids), np.float32)
            mask[[self.pos[i] for i in allowed if i in self.pos]] = 1
            if not mask.any():
                return []
        docs, scores = self.model.retrieve([terms], k=min(k, len(self.ids)), show_progress=False, weight_mask=mask)
        return [(int(self.ids[d]), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]
