"""Second-stage re-ranking of retrieved chunks.

``CrossEncoderReranker`` runs a sentence-transformers ``CrossEncoder`` from a local path.
No cross-encoder model is available offline here, so the default is
``SentenceReranker``: a late-interaction re-ranker built from the same bi-encoder. Each
chunk's sentences were embedded at ingest time; a chunk scores
``alpha * max_sentence_cosine + (1 - alpha) * chunk_cosine`` (alpha 0.7, chosen on a dev split
of other articles than the benchmark's, docs/rag.md), so a chunk whose one sentence
answers the query beats a chunk that is only loosely about the topic (a 500-token chunk's
single vector is an average over many topics). Its effect is measured in bench/rag_eval.py
(docs/rag.md). Both also pick the best-matching sentence as the citation snippet.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from servelm.rag.store.base import ChunkRecord


@dataclass(slots=True)
class Hit:
    """A retrieved chunk. ``relevance`` is the best cosine (chunk or sentence) with the query,
    comparable across re-rankers, so the relevance threshold means the same for all."""

    chunk: ChunkRecord
    score: float = 0.0
    relevance: float = 0.0
    snippet: tuple[int, int] = (0, 0)  # offsets of the best sentence inside chunk.text


def annotate(query_vec: np.ndarray, hits: list[Hit]) -> None:
    """Set each hit's ``relevance`` and ``snippet`` from its chunk and sentence vectors."""
    for h in hits:
        c = h.chunk
        dense = float(c.vector @ query_vec) if c.vector is not None else 0.0
        h.relevance, h.snippet = dense, (0, len(c.text))
        if c.sent_vecs is not None and len(c.sent_vecs):
            sims = c.sent_vecs @ query_vec
            best = int(np.argmax(sims))
            h.snippet = tuple(c.sent_spans[best])
            h.relevance = max(dense, float(sims[best]))


class SentenceReranker:
    """Bi-encoder late interaction: mixes best-sentence and whole-chunk cosine."""

    name = "sentence-maxsim(all-MiniLM-L6-v2)"

    def __init__(self, alpha: float = 0.7):
        self.alpha = alpha

    def rerank(self, query: str, query_vec: np.ndarray, hits: list[Hit]) -> list[Hit]:
        """Return ``hits`` sorted by the mixed score (best first)."""
        for h in hits:
            c = h.chunk
            dense = float(c.vector @ query_vec)
            best = float(np.max(c.sent_vecs @ query_vec)) if c.sent_vecs is not None and len(c.sent_vecs) else dense
            h.score = self.alpha * best + (1 - self.alpha) * dense
        return sorted(hits, key=lambda h: -h.score)


class CrossEncoderReranker:
    """A sentence-transformers ``CrossEncoder`` loaded from a local directory."""

    def __init__(self, path: str):
        import os

        from sentence_transformers import CrossEncoder

        if not os.path.isdir(path):
            raise FileNotFoundError(f"cross-encoder directory {path!r} not found; pass a local model or reranker='sentence'")
        self.model = CrossEncoder(path, device="cpu", local_files_only=True)
        self.name = f"cross-encoder({os.path.basename(path.rstrip('/'))})"

    def rerank(self, query: str, query_vec: np.ndarray, hits: list[Hit]) -> list[Hit]:
        """Return ``hits`` sorted by cross-encoder score (best first)."""
        if not hits:
            return hits
        scores = self.model.predict([(query, h.chunk.text) for h in hits], show_progress_bar=False)
        for h, s in zip(hits, scores):
            h.score = float(s)
        return sorted(hits, key=lambda h: -h.score)


class NoReranker:
    """Keeps the fused (RRF) order; selected explicitly with ``reranker="none"``."""

    name = "none"

    def rerank(self, query: str, query_vec: np.ndarray, hits: list[Hit]) -> list[Hit]:
        """Return ``hits`` unchanged."""
        return hits


def make_reranker(spec: str):
    """Return the re-ranker for ``spec``: "sentence", "none" or a CrossEncoder directory."""
    if spec in ("sentence", "", None):
        return SentenceReranker()
    if spec == "none":
        return NoReranker()
    return CrossEncoderReranker(spec)
