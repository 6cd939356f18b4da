"""The embedded store: SQLite holds documents, chunks and vectors; FAISS indexes them.

SQLite is the source of truth and every document change is one SQLite transaction, so a
crash (even SIGKILL) mid-ingest leaves the last committed documents. The FAISS index is a
derived snapshot: it is written atomically (temp file, fsync, rename) with the collection
version in its name, and rebuilt from SQLite whenever that version does not match; this
also picks up changes another process (e.g. ``servelm ingest``) committed.

Search is exact (``IndexFlatIP``) by default. With ``ann_threshold`` > 0, a collection of at least
that many chunks gets an inverted-file index (``IndexIVFFlat``, about 4·√n lists, ``nprobe`` of them
searched), which answers a query in under a millisecond instead of scanning every vector (~6 ms of
CPU at 100k) but misses some neighbours and trains k-means at ingest; both are measured in
docs/rag.md, which is why it is opt-in. Filtered searches on it probe every list, so they stay exact.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import threading
import time

import faiss
import numpy as np

from servelm.paths import open_sqlite
from servelm.rag.schemas import Collection
from servelm.rag.store.base import (ChunkRecord, Conflict, DocumentRecord, NotFound,
                                    VectorStore, check_name, check_vectors, pack_f16, unpack_f16)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (name TEXT PRIMARY KEY, dim INTEGER, model TEXT, created REAL,
                                        version INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS documents (collection TEXT, doc_id TEXT, source TEXT, content_hash TEXT,
                                      num_chunks INTEGER, meta TEXT, created REAL, PRIMARY KEY (collection, doc_id));
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT, doc_id TEXT, idx INTEGER,
                                   source TEXT, page INTEGER, start INTEGER, end_ INTEGER, text TEXT, meta TEXT,
                                   vector BLOB, sent_spans TEXT, sent_vecs BLOB);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks (collection, doc_id);
"""
_COLUMNS = {"doc_id": "doc_id", "source": "source", "page": "page"}
_KEY_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _is_ivf(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexIVF)


def where_sql(where: dict, json_expr) -> tuple[str, list]:
    """Return an SQL condition and its parameters for an equality/IN filter dict.

    ``json_expr(key)`` renders a metadata lookup. Raises ValueError for a bad key.
    """
    conds, params = [], []
    for key, val in where.items():
        if not _KEY_RE.match(str(key)):
            raise ValueError(f"invalid filter key {key!r}: use letters, digits and '_'")
        col = _COLUMNS.get(key) or json_expr(key)
        vals = list(val) if isinstance(val, (list, tuple, set)) else [val]
        if not vals:
            conds.append("FALSE")
            continue
        conds.append(f"{col} IN ({','.join(['%s'] * len(vals))})")
        params += [v if key in _COLUMNS else (json.dumps(v) if not isinstance(v, str) else v) for v in vals]
    return " AND ".join(conds) or "TRUE", params


class FaissStore(VectorStore):
    """FAISS (exact inner product; IVF from ``ann_threshold`` chunks when > 0) + SQLite under ``data_dir``."""

    def __init__(self, data_dir: str, ann_threshold: int = 0, nprobe: int = 128):
        self.ann_threshold, self.nprobe = ann_threshold, nprobe
        os.makedirs(os.path.join(data_dir, "faiss"), exist_ok=True)
        self.dir = data_dir
        self.db = open_sqlite(os.path.join(data_dir, "store.sqlite"), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.RLock()
        self._index: dict[str, tuple[int, faiss.Index]] = {}  # name -> (version, index)
        self._saved: dict[str, int] = {}

    # -- collections -------------------------------------------------------
    def create_collection(self, name, dim, model):
        check_name(name)
        with self.lock:
            if self._row(name):
                raise Conflict(f"collection {name!r} already exists")
            self.db.execute("INSERT INTO collections VALUES (?,?,?,?,0)", (name, dim, model, time.time()))
        return self.get_collection(name)

    def _row(self, name):
        return self.db.execute("SELECT dim, model, created, version FROM collections WHERE name=?", (name,)).fetchone()

    def _need(self, name):
        row = self._row(name)
        if not row:
            raise NotFound(f"collection {name!r} not found")
        return row

    def get_collection(self, name):
        with self.lock:
            dim, model, created, _ = self._need(name)
            nd, = self.db.execute("SELECT COUNT(*) FROM documents WHERE collection=?", (name,)).fetchone()
            nc, = self.db.execute("SELECT COUNT(*) FROM chunks WHERE collection=?", (name,)).fetchone()
        return Collection(name=name, dim=dim, model=model, created=created, num_documents=nd, num_chunks=nc)

    def list_collections(self):
        with self.lock:
            names = [r[0] for r in self.db.execute("SELECT name FROM collections ORDER BY name")]
        return [self.get_collection(n) for n in names]

    def delete_collection(self, name):
        with self.lock:
            self._need(name)
            self.db.execute("BEGIN IMMEDIATE")
            for t in ("chunks", "documents"):
                self.db.execute(f"DELETE FROM {t} WHERE collection=?", (name,))
            self.db.execute("DELETE FROM collections WHERE name=?", (name,))
            self.db.execute("COMMIT")
            self._index.pop(name, None)
            for f in glob.glob(os.path.join(self.dir, "faiss", f"{glob.escape(name)}@v*.faiss")):
                os.unlink(f)

    # -- documents ---------------------------------------------------------
    def list_documents(self, name):
        with self.lock:
            self._need(name)
            rows = self.db.execute("SELECT doc_id, source, content_hash, num_chunks, meta, created FROM documents "
                                   "WHERE collection=? ORDER BY source", (name,)).fetchall()
        return [DocumentRecord(d, s, h, n, json.loads(m or "{}"), c) for d, s, h, n, m, c in rows]

    def replace_document(self, name, doc, chunks):
        with self.lock:
            check_vectors(chunks, self._need(name)[0])
            self.db.execute("BEGIN IMMEDIATE")
            try:
                old = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE collection=? AND doc_id=?", (name, doc.doc_id))]
                self.db.execute("DELETE FROM chunks WHERE collection=? AND doc_id=?", (name, doc.doc_id))
                self.db.execute("INSERT OR REPLACE INTO documents VALUES (?,?,?,?,?,?,?)",
                                (name, doc.doc_id, doc.source, doc.content_hash, len(chunks), json.dumps(doc.meta),
                                 doc.created or time.time()))
                new = []
                for i, c in enumerate(chunks):
                    cur = self.db.execute(
                        "INSERT INTO chunks (collection, doc_id, idx, source, page, start, end_, text, meta, vector, sent_spans, sent_vecs) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (name, doc.doc_id, i, c.source, c.page, c.start, c.end, c.text, json.dumps(c.meta),
                         np.asarray(c.vector, np.float32).tobytes(), json.dumps(c.sent_spans), pack_f16(c.sent_vecs)))
                    c.id = cur.lastrowid
                    new.append(c)
                self.db.execute("UPDATE collections SET version=version+1 WHERE name=?", (name,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self._apply(name, old, new)

    def delete_document(self, name, doc_id):
        with self.lock:
            self._need(name)
            self.db.execute("BEGIN IMMEDIATE")
            if not self.db.execute("SELECT 1 FROM documents WHERE collection=? AND doc_id=?", (name, doc_id)).fetchone():
                self.db.execute("ROLLBACK")
                raise NotFound(f"document {doc_id!r} not found in collection {name!r}")
            old = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE collection=? AND doc_id=?", (name, doc_id))]
            self.db.execute("DELETE FROM chunks WHERE collection=? AND doc_id=?", (name, doc_id))
            self.db.execute("DELETE FROM documents WHERE collection=? AND doc_id=?", (name, doc_id))
            self.db.execute("UPDATE collections SET version=version+1 WHERE name=?", (name,))
            self.db.execute("COMMIT")
            self._apply(name, old, [])

    # -- FAISS -------------------------------------------------------------
    def _apply(self, name, removed_ids, added):
        """Mirror a committed change into the in-memory index (if it is current)."""
        version = self._row(name)[3]
        cur = self._index.get(name)
        if cur is None or cur[0] != version - 1:
            self._index.pop(name, None)  # stale: rebuilt from SQLite on next use
            return
        index = cur[1]
        if removed_ids:
            index.remove_ids(np.array(removed_ids, np.int64))
        if added:
            index.add_with_ids(np.stack([c.vector for c in added]).astype(np.float32),
                               np.array([c.id for c in added], np.int64))
        self._index[name] = (version, index)
        if self.ann_threshold and not _is_ivf(index) and index.ntotal >= self.ann_threshold:
            self._index.pop(name)
            self._get_index(name)  # grown past the threshold: build the IVF index now, at ingest, not in a query

    def _get_index(self, name) -> faiss.Index:
        dim, _, _, version = self._need(name)
        cur = self._index.get(name)
        if cur and cur[0] == version:
            return cur[1]
        path = os.path.join(self.dir, "faiss", f"{name}@v{version}.faiss")
        if os.path.exists(path):
            index = faiss.read_index(path)
            self._saved[name] = version
        else:
            ids, vecs = [], []
            for cid, v in self.db.execute("SELECT id, vector FROM chunks WHERE collection=?", (name,)):
                ids.append(cid)
                vecs.append(np.frombuffer(v, np.float32))
            vecs = np.stack(vecs) if ids else np.zeros((0, dim), np.float32)
            index = self._new_index(dim, vecs)
            if ids:
                index.add_with_ids(vecs, np.array(ids, np.int64))
        if _is_ivf(index):
            index.nprobe = self.nprobe
        self._index[name] = (version, index)
        return index

    def _new_index(self, dim: int, vecs: np.ndarray) -> faiss.Index:
        """Returns an empty index for ``vecs``: exact below ``ann_threshold``, else IVF trained on them."""
        if not self.ann_threshold or len(vecs) < self.ann_threshold:
            return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        nlist = max(1, min(int(4 * math.sqrt(len(vecs))), len(vecs) // 39))  # k-means wants >= 39 points a list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(len(vecs))[:64 * nlist]  # 64 per list: enough for k-means
        index.train(vecs[np.sort(sample)])
        return index

    def flush(self) -> None:
        """Write each changed in-memory FAISS index atomically (temp file, fsync, rename)."""
        with self.lock:
            for name, (version, index) in list(self._index.items()):
                if self._saved.get(name) == version:
                    continue
                final = os.path.join(self.dir, "faiss", f"{name}@v{version}.faiss")
                tmp = final + f".tmp{os.getpid()}"
                faiss.write_index(index, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                for old in glob.glob(os.path.join(self.dir, "faiss", f"{glob.escape(name)}@v*.faiss")):
                    if old != final:
                        os.unlink(old)
                self._saved[name] = version

    def close(self):
        self.flush()
        self.db.close()

    # -- queries -----------------------------------------------------------
    def search(self, name, vector, k, where=None):
        with self.lock:
            index = self._get_index(name)
            if index.ntotal == 0:
                return []
            q = np.asarray(vector, np.float32).reshape(1, -1)
            params = None
            if where:
                allowed = self.filter_ids(name, where)
                if not allowed:
                    return []
                sel = faiss.IDSelectorBatch(np.fromiter(allowed, np.int64))
                params = (faiss.SearchParametersIVF(sel=sel, nprobe=index.nlist) if _is_ivf(index)
                          else faiss.SearchParameters(sel=sel))
            # One query is one thread's work: on a busy CPU, OpenMP's threads spin-wait for each other
            # (measured at 100k chunks: 116 ms with 2 threads, 15 ms with 1; docs/rag.md). Process-wide.
            faiss.omp_set_num_threads(1)
            scores, ids = index.search(q, min(k, index.ntotal), params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def filter_ids(self, name, where):
        cond, params = where_sql(where, lambda k: f"CAST(json_extract(meta, '$.{k}') AS TEXT)")
        cond = cond.replace("%s", "?")
        with self.lock:
            return {r[0] for r in self.db.execute(f"SELECT id FROM chunks WHERE collection=? AND {cond}", [name, *params])}

    def get_chunks(self, name, ids, vectors=False):
        if not ids:
            return []
        with self.lock:
            dim = self._need(name)[0]
            cols = "id, doc_id, source, text, start, end_, page, idx, meta, sent_spans, sent_vecs" + (", vector" if vectors else "")
            rows = {}
            for i in range(0, len(ids), 500):
                part = list(ids[i:i + 500])
                # By primary key; "collection=?" in SQL made SQLite scan the collection's index.
                q = f"SELECT collection, {cols} FROM chunks WHERE id IN ({','.join('?' * len(part))})"
                for r in self.db.execute(q, part):
                    if r[0] == name:
                        rows[r[1]] = r[1:]
        out = []
        for i in ids:
            if i in rows:
                r = rows[i]
                out.append(ChunkRecord(r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8] or "{}"),
                                       np.frombuffer(r[11], np.float32) if vectors else None,
                                       [tuple(s) for s in json.loads(r[9] or "[]")], unpack_f16(r[10], dim), r[0]))
        return out

    def all_texts(self, name):
        with self.lock:
            self._need(name)
            rows = self.db.execute("SELECT id, text FROM chunks WHERE collection=? ORDER BY id", (name,)).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def version(self, name):
        with self.lock:
            return self._need(name)[3]
