"""``RagService``: one method per RAG route, so the server's handlers are one-liners.

    svc = RagService(RagConfig(data_dir=...), count_tokens=..., context_window=engine.max_model_len)
    POST   /v1/collections                  -> await svc.create_collection(CollectionCreate)
    GET    /v1/collections                  -> await svc.list_collections()
    GET    /v1/collections/{name}           -> await svc.get_collection(name)
    DELETE /v1/collections/{name}           -> await svc.delete_collection(name)
    POST   /v1/collections/{name}/documents -> await svc.add_document(name, filename, data)
    POST   /v1/rag/query                    -> await svc.query(req, generate)  /  svc.query_stream(req, generate)
    chat completions with ``rag``           -> await svc.augment(messages, RagOptions)

``generate(messages) -> AsyncIterator[str]`` yields answer text deltas (the server wraps its
engine). Errors: :func:`http_status` maps NotFound → 404, Conflict → 409, ValueError → 400.
"""
from __future__ import annotations

import asyncio
import os
from typing import AsyncIterator, Awaitable, Callable

from servelm.rag.answer import NO_ANSWER, Render, build_messages, cited_sources
from servelm.rag.config import RagConfig
from servelm.rag.embedder import Embedder, EmbeddingCache
from servelm.rag.ingest import Ingestor, IngestReport
from servelm.rag.reranker import Hit
from servelm.rag.retriever import Retriever
from servelm.rag.schemas import (Collection, CollectionCreate, CollectionList, Deleted, DocumentResult,
                                 RagOptions, RagQueryRequest, RagQueryResponse, RagStreamDelta)
from servelm.rag.splitter import Splitter
from servelm.rag.store.base import Conflict, NotFound, VectorStore

Generate = Callable[[list[dict]], AsyncIterator[str]]


class BadDocument(ValueError):
    """An uploaded file could not be ingested (HTTP 400); the message says what to fix."""


def http_status(exc: BaseException) -> int:
    """Return the HTTP status for an exception raised by RagService (500 if unknown)."""
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, ValueError):
        return 400
    return 500


def open_store(cfg: RagConfig) -> VectorStore:
    """Return the store ``cfg`` selects (FAISS in ``data_dir``, or PostgreSQL + pgvector)."""
    if cfg.store == "faiss":
        from servelm.rag.store.faiss_store import FaissStore
        return FaissStore(cfg.data_dir, cfg.ann_threshold, cfg.ann_nprobe)
    from servelm.rag.store.pgvector_store import PgVectorStore, start_pgserver
    if not (cfg.pg_dsn or cfg.pg_datadir):
        raise ValueError("store='pgvector' needs pg_dsn (postgresql://...) or pg_datadir (bundled server)")
    return PgVectorStore(cfg.pg_dsn or start_pgserver(cfg.pg_datadir))


class RagService:
    """The RAG subsystem behind the routes. Blocking work runs in threads."""

    def __init__(self, config: RagConfig | None = None, embedder: Embedder | None = None,
                 store: VectorStore | None = None, count_tokens: Callable[[list[dict]], int] | None = None,
                 context_window: int = 2048):
        self.cfg = (config or RagConfig()).resolved()
        os.makedirs(self.cfg.data_dir, exist_ok=True)
        self.embedder = embedder or Embedder(self.cfg.embed_model, self.cfg.embed_batch_size,
                                             EmbeddingCache(os.path.join(self.cfg.data_dir, "embeddings.sqlite")),
                                             threads=self.cfg.embed_threads)
        self.store = store or open_store(self.cfg)
        self.splitter = Splitter(self.embedder.tokenizer, self.cfg.chunk_size, self.cfg.chunk_overlap)
        self.ingestor = Ingestor(self.store, self.embedder, self.splitter, self.cfg.max_file_bytes,
                                 batch_chunks=self.cfg.embed_batch_size)
        self.retriever = Retriever(self.store, self.embedder, self.cfg)
        self.count_tokens = count_tokens or self._approx_tokens
        self.context_window = context_window
        # Retrieved chunks are third-party text: ``screen(hits) -> hits`` drops the ones a guard refuses
        # (an injected instruction in a document) before they reach the prompt; the server sets it.
        self.screen: Callable[[list[Hit]], Awaitable[list[Hit]]] | None = None

    def _approx_tokens(self, messages: list[dict]) -> int:
        # Without the answering model's tokenizer: the embedding tokenizer plus per-message framing.
        return sum(self.splitter.count(m["content"]) + 8 for m in messages)

    # -- collections ---------------------------------------------------------
    async def create_collection(self, req: CollectionCreate) -> Collection:
        """Create a collection for this embedding model; raises Conflict if the name is taken."""
        return await asyncio.to_thread(self.store.create_collection, req.name, self.embedder.dim, self.embedder.name)

    async def list_collections(self) -> CollectionList:
        """Return every collection."""
        return CollectionList(data=await asyncio.to_thread(self.store.list_collections))

    async def get_collection(self, name: str) -> Collection:
        """Return one collection; raises NotFound."""
        return await asyncio.to_thread(self.store.get_collection, name)

    async def delete_collection(self, name: str) -> Deleted:
        """Delete a collection and all its vectors; raises NotFound."""
        await asyncio.to_thread(self.store.delete_collection, name)
        return Deleted(name=name)

    # -- documents -----------------------------------------------------------
    async def add_document(self, name: str, filename: str, data: bytes) -> DocumentResult:
        """Ingest an uploaded file (same filename again = update). Raises NotFound, or
        BadDocument (400) with the reason for an unsupported, empty, corrupt, encrypted or too large file."""
        self._check_dim(name)
        r = await asyncio.to_thread(self.ingestor.ingest_bytes, name, os.path.basename(filename or ""), data)
        if r.status == "error":
            raise BadDocument(r.error)
        await asyncio.to_thread(self._flush)
        return DocumentResult(source=r.source, status=r.status, chunks=r.chunks, doc_id=r.doc_id, error=r.error)

    async def list_documents(self, name: str) -> list[dict]:
        """Return the documents of a collection (doc_id, source, content_hash, num_chunks)."""
        docs = await asyncio.to_thread(self.store.list_documents, name)
        return [{"doc_id": d.doc_id, "source": d.source, "content_hash": d.content_hash, "num_chunks": d.num_chunks}
                for d in docs]

    async def delete_document(self, name: str, doc_id: str) -> None:
        """Delete one document and its vectors; raises NotFound."""
        await asyncio.to_thread(self.store.delete_document, name, doc_id)
        await asyncio.to_thread(self._flush)

    def ingest_paths(self, name: str, paths: list[str], progress: bool = True, create: bool = True,
                     on_file=None, jobs: int = 1) -> IngestReport:
        """Ingest files/directories (blocking; the CLI's entry), ``jobs`` files loaded in parallel.
        Creates the collection if asked."""
        if create:
            try:
                self.store.create_collection(name, self.embedder.dim, self.embedder.name)
            except Conflict:
                pass
        self._check_dim(name)
        return self.ingestor.ingest_paths(name, paths, progress=progress, on_file=on_file, jobs=jobs)

    def _check_dim(self, name: str) -> None:
        if self.store.get_collection(name).dim != self.embedder.dim:
            raise ValueError(f"collection {name!r} was built with another embedding model (dim mismatch)")

    def _flush(self) -> None:
        if hasattr(self.store, "flush"):
            self.store.flush()

    # -- retrieval and answers -------------------------------------------------
    async def retrieve(self, name: str, query: str, k: int = 5, filters: dict | None = None,
                       mmr: bool | None = None) -> list[Hit]:
        """Return the re-ranked hits for ``query`` (no generation)."""
        return await asyncio.to_thread(self.retriever.retrieve, name, query, k, filters, mmr)

    async def _prepare(self, req: RagQueryRequest, history=None, render: Render | None = None
                       ) -> tuple[list[dict] | None, list[Hit]]:
        hits = await self.retrieve(req.collection, req.query, req.k, req.filters, req.mmr)
        floor = self.cfg.relevance_threshold if req.min_relevance is None else req.min_relevance
        hits = [h for h in hits if h.relevance >= floor]
        if hits and self.screen is not None:
            hits = await self.screen(hits)
        if not hits:
            return None, []
        messages, used = build_messages(req.query, hits, self.count_tokens, self.context_window,
                                        self.cfg.answer_reserve_tokens, history, render=render)
        return messages, used

    async def query(self, req: RagQueryRequest, generate: Generate) -> RagQueryResponse:
        """Answer ``req.query`` from the collection with cited sources.

        Below the relevance threshold the answer says the documents do not contain it (no generation).
        """
        final = None
        async for ev in self.query_stream(req, generate):
            final = ev
        return final

    async def query_stream(self, req: RagQueryRequest, generate: Generate) -> AsyncIterator[RagStreamDelta | RagQueryResponse]:
        """Yield ``RagStreamDelta`` events as the answer is generated, then the ``RagQueryResponse``."""
        messages, used = await self._prepare(req)
        if messages is None:
            yield RagStreamDelta(delta=NO_ANSWER)
            yield RagQueryResponse(answer=NO_ANSWER, sources=[], found=False)
            return
        parts = []
        async for delta in generate(messages):
            if delta:
                parts.append(delta)
                yield RagStreamDelta(delta=delta)
        answer = "".join(parts)
        yield RagQueryResponse(answer=answer, sources=cited_sources(answer, used), found=True)

    async def augment(self, messages: list[dict], opts: RagOptions, render: Render | None = None
                      ) -> tuple[list[dict], list[Hit]]:
        """For chat completions with ``rag``: return the messages with the retrieved context in a
        layered prompt (the last user message is the question, earlier turns the history), and the
        hits used (numbered 1..n, for ``cited_sources``). With nothing relevant, the messages are
        returned unchanged with no hits. ``render(context) -> messages`` (a prompt strategy's) replaces
        the default layered prompt, see :func:`build_messages`."""
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last is None:
            raise ValueError("rag needs at least one user message (the question)")
        question = str(messages[last].get("content") or "")
        req = RagQueryRequest(collection=opts.collection, query=question, k=opts.k, filters=opts.filters,
                              min_relevance=opts.min_relevance)
        out, used = await self._prepare(req, history=[m for m in messages[:last] if m.get("role") != "system"],
                                        render=render)
        return (out, used) if out is not None else (messages, [])

    def close(self) -> None:
        """Flush indexes and close the store."""
        self.store.close()
