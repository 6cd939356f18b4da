"""Hybrid retrieval: dense top-k + BM25, fused by reciprocal rank fusion, then re-ranked.

RRF (Cormack, Clarke & Büttcher 2009) scores a chunk ``sum(1 / (rrf_k + rank))`` over the
rankings it appears in; it needs no score calibration between cosine and BM25.

Exact codes: a query token with a digit in it (an error code, an id) that occurs in at most ``k``
chunks puts those chunks first. Fusion alone cannot: BM25 ranks such a chunk first, but the dense
side has no notion of the token, so the chunk gets one RRF term against other chunks' two, and the
re-ranker (cosine only) then drops it below the chunks that merely share the query's other words.
"""
from __future__ import annotations

import threading

import numpy as np

from servelm.rag.bm25 import BM25Index
from servelm.rag.config import RagConfig
from servelm.rag.reranker import Hit, annotate, make_reranker


def rrf(rankings: list[list[int]], k: int = 60) -> list[tuple[int, float]]:
    """Return ``(id, fused_score)`` over all rankings, best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking):
            scores[i] = scores.get(i, 0.0) + 1.0 / (k + rank + 1)
    return sorted(scores.items(), key=lambda x: (-x[1], x[0]))


def mmr(query_vec: np.ndarray, hits: list[Hit], k: int, lam: float) -> list[Hit]:
    """Return ``k`` hits chosen by maximal marginal relevance (Carbonell & Goldstein 1998)."""
    if len(hits) <= 1:
        return hits[:k]
    vecs = np.stack([h.chunk.vector for h in hits])
    rel = np.array([h.score for h in hits])
    rel = (rel - rel.min()) / (rel.max() - rel.min() + 1e-9)  # the re-ranker's scale, mapped to 0..1
    chosen, left = [0], list(range(1, len(hits)))
    while left and len(chosen) < k:
        sim = (vecs[left] @ vecs[chosen].T).max(axis=1)
        best = int(np.argmax(lam * rel[left] - (1 - lam) * sim))
        chosen.append(left.pop(best))
    return [hits[i] for i in chosen]


class Retriever:
    """Runs the retrieval pipeline over a store; BM25 indexes are cached per collection version."""

    def __init__(self, store, embedder, config: RagConfig, reranker=None):
        self.store, self.embedder, self.cfg = store, embedder, config
        self.reranker = reranker or make_reranker(config.reranker)
        self._bm25: dict[str, tuple[int, BM25Index]] = {}
        self._lock = threading.Lock()

    def bm25(self, name: str) -> BM25Index:
        """Return the collection's BM25 index, rebuilt when its content changed."""
        version = self.store.version(name)
        with self._lock:
            cur = self._bm25.get(name)
            if cur is None or cur[0] != version:
                cur = (version, BM25Index(*self.store.all_texts(name)))
                self._bm25[name] = cur
            return cur[1]

    def retrieve(self, name: str, query: str, k: int | None = None, where: dict | None = None,
                 use_mmr: bool | None = None) -> list[Hit]:
        """Return up to ``k`` hits for ``query``, best first.

        Raises NotFound for an unknown collection, ValueError for an empty query or bad filter.
        """
        if not query or not query.strip():
            raise ValueError("query must not be empty")
        k = k or self.cfg.k
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        fetch = max(self.cfg.fetch_k, k)
        qv = self.embedder.embed_query(query)
        rankings = [[i for i, _ in self.store.search(name, qv, fetch, where)]]
        exact: list[int] = []
        if self.cfg.use_bm25:
            allowed = self.store.filter_ids(name, where) if where else None
            index = self.bm25(name)
            rankings.append([i for i, _ in index.search(query, fetch, allowed)])
            exact = index.exact_matches(query, k, allowed)
        fused = rrf(rankings, self.cfg.rrf_k)[:fetch]
        fused_score = dict(fused)
        ids = [i for i, _ in fused] + [i for i in exact if i not in fused_score]
        chunks = self.store.get_chunks(name, ids, vectors=True)
        hits = [Hit(c, fused_score.get(c.id, 0.0)) for c in chunks]
        annotate(qv, hits)
        hits = self.reranker.rerank(query, qv, hits)
        pinned = set(exact)
        first = [h for h in hits if h.chunk.id in pinned]
        rest = [h for h in hits if h.chunk.id not in pinned]
        if (use_mmr if use_mmr is not None else self.cfg.mmr) and len(first) < k:
            rest = mmr(qv, rest, k - len(first), self.cfg.mmr_lambda)
        return (first + rest)[:k]
