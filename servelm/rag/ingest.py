"""Ingestion: load → split → embed (each sentence once; a chunk's vector from its sentences') → store, one document per transaction.

Documents are identified by source (absolute path, or upload filename) and versioned by the
SHA-256 of their bytes: unchanged files are skipped, changed ones replaced, a file whose
bytes already exist under another source is reported as a duplicate, and files that vanished
from an ingested directory are removed. A bad file gets an error naming the fix while the
rest of the batch goes on.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from servelm.rag.loaders import SUPPORTED, LoaderError, load_bytes
from servelm.rag.splitter import Chunk
from servelm.rag.store.base import ChunkRecord, DocumentRecord

_SENT_RE = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n\s*")


@dataclass(slots=True)
class FileResult:
    """What happened to one file: status is added, updated, unchanged, duplicate, removed or error."""

    source: str
    status: str
    chunks: int = 0
    doc_id: str = ""
    error: str | None = None


@dataclass(slots=True)
class IngestReport:
    results: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "error"]

    @property
    def chunks(self) -> int:
        return sum(r.chunks for r in self.results if r.status in ("added", "updated"))

    def to_dict(self) -> dict:
        """Return a JSON-ready summary with per-file results."""
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        return {"counts": counts, "chunks": self.chunks, "seconds": round(self.seconds, 3),
                "files": [asdict(r) for r in self.results]}


def doc_id_for(source: str) -> str:
    """Return the stable document id of a source."""
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Return the ``(start, end)`` offsets of the non-empty sentences/lines of ``text``."""
    spans, prev = [], 0
    for m in list(_SENT_RE.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        seg = text[prev:end]
        if seg.strip():
            a = prev + len(seg) - len(seg.lstrip())
            spans.append((a, prev + len(seg.rstrip())))
        prev = m.end() if m else prev
    return spans


@dataclass(slots=True)
class _Pending:
    """A file loaded and split, waiting for its embeddings and its transaction."""

    source: str
    doc_id: str
    digest: str
    filename: str
    meta: dict
    old: DocumentRecord | None
    chunks: list[Chunk]


class Ingestor:
    def __init__(self, store, embedder, splitter, max_file_bytes: int, batch_chunks: int = 64):
        self.store, self.embedder, self.splitter = store, embedder, splitter
        self.max_file_bytes = max_file_bytes
        # Small files are embedded together, up to this many chunks, so a directory of short notes
        # fills the model's batches instead of running one tiny forward pass per file.
        self.batch_chunks = batch_chunks

    def ingest_bytes(self, name: str, filename: str, data: bytes, source: str | None = None,
                     meta: dict | None = None, known: dict | None = None) -> FileResult:
        """Ingest one file's bytes into collection ``name``; returns its FileResult (never raises
        for bad file content: the error is in the result). Raises NotFound for a missing collection."""
        docs = known if known is not None else {d.doc_id: d for d in self.store.list_documents(name)}
        plan = self._plan(filename, data, source, meta, docs)
        if isinstance(plan, FileResult):
            return plan
        return self._commit(name, plan, self._embed(plan.chunks, plan.doc_id, plan.meta), docs)

    def _plan(self, filename: str, data: bytes, source: str | None, meta: dict | None,
              docs: dict, check_twin: bool = True) -> "_Pending | FileResult":
        """Return the loaded and split file, or its FileResult when there is nothing to embed.
        ``check_twin=False`` leaves the duplicate check to the caller (loader threads must not
        iterate ``docs`` while the committing thread adds to it)."""
        source = source or filename
        doc_id = doc_id_for(source)
        # The splitter settings are part of the version: re-ingesting with another chunk size re-splits.
        digest = f"{hashlib.sha256(data).hexdigest()}:{self.splitter.chunk_size}/{self.splitter.overlap}"
        old = docs.get(doc_id)
        if old and old.content_hash == digest:
            return FileResult(source, "unchanged", old.num_chunks, doc_id)
        if check_twin and (twin := self._twin(docs, digest, doc_id, source)):
            return twin
        try:
            pages = load_bytes(filename, data, self.max_file_bytes)
        except LoaderError as e:
            return FileResult(source, "error", 0, doc_id, str(e))
        chunks: list[Chunk] = []
        base = 0
        for p in pages:
            chunks += self.splitter.split(p.text, base=base, page=p.page, source=source)
            base += len(p.text) + 2  # pages are joined by a blank line in the document's text
        return _Pending(source, doc_id, digest, filename, dict(meta or {}), old, chunks)

    @staticmethod
    def _twin(docs: dict, digest: str, doc_id: str, source: str) -> FileResult | None:
        twin = next((d for d in docs.values() if d.content_hash == digest and d.doc_id != doc_id), None)
        if twin is None:
            return None
        return FileResult(source, "duplicate", 0, doc_id, f"same content as {twin.source}; not stored twice")

    def _commit(self, name: str, p: _Pending, records: list[ChunkRecord], docs: dict) -> FileResult:
        # Checked again here: an identical file planned in the same batch may have been stored since.
        twin = self._twin(docs, p.digest, p.doc_id, p.source)
        if twin:
            return twin
        doc = DocumentRecord(p.doc_id, p.source, p.digest, len(records),
                             dict(p.meta, filename=os.path.basename(p.filename)), time.time())
        self.store.replace_document(name, doc, records)
        docs[p.doc_id] = doc
        return FileResult(p.source, "updated" if p.old else "added", len(records), p.doc_id)

    def _embed(self, chunks: list[Chunk], doc_id: str, meta: dict) -> list[ChunkRecord]:
        spans = [sentence_spans(c.text) for c in chunks]
        vecs = self.embedder.embed_passages([c.text for c in chunks], spans)
        return [ChunkRecord(doc_id, c.source, c.text, c.start, c.end, c.page, i, dict(meta), v, sp, sv)
                for i, (c, sp, (v, sv)) in enumerate(zip(chunks, spans, vecs))]

    def _read(self, f: str, docs: dict) -> "_Pending | FileResult":
        try:
            if os.path.getsize(f) > self.max_file_bytes:
                raise LoaderError(f"{f}: {os.path.getsize(f)} bytes is over the size limit of {self.max_file_bytes} bytes")
            if os.path.splitext(f)[1].lower() not in SUPPORTED:
                raise LoaderError(f"{f}: unsupported file type; supported: {', '.join(SUPPORTED)}")
            with open(f, "rb") as fh:
                data = fh.read()
        except (OSError, LoaderError) as e:
            return FileResult(f, "error", doc_id=doc_id_for(f), error=str(e))
        return self._plan(f, data, f, None, docs, check_twin=False)

    def ingest_paths(self, name: str, paths: list[str], progress: bool = True,
                     on_file: Callable[[FileResult], None] | None = None, jobs: int = 1) -> IngestReport:
        """Ingest files and directories (recursively) into ``name``; returns the report.

        ``on_file`` is called after each file is committed (or failed), e.g. to report progress.
        ``jobs`` files are loaded and split in parallel threads while the model embeds (loaders and
        the splitter run while torch computes without the GIL).

        Documents previously ingested from a given directory whose files are gone are removed.
        Raises NotFound for a missing collection.
        """
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        t0 = time.time()
        report = IngestReport()
        files, roots = [], []
        for p in paths:
            ap = os.path.abspath(p)
            if os.path.isdir(ap):
                roots.append(ap)
                for dirpath, dirnames, names in os.walk(ap):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    files += [os.path.join(dirpath, n) for n in sorted(names) if not n.startswith(".")]
            elif os.path.isfile(ap):
                files.append(ap)
            else:
                report.results.append(FileResult(ap, "error", error=f"{p}: no such file or directory"))
        known = {d.doc_id: d for d in self.store.list_documents(name)}
        # Removals first, so a file that moved (same bytes, new path) is not taken for a duplicate.
        seen = set(files)
        for d in list(known.values()):
            if any(d.source.startswith(r + os.sep) for r in roots) and d.source not in seen and not os.path.exists(d.source):
                self.store.delete_document(name, d.doc_id)
                del known[d.doc_id]
                report.results.append(FileResult(d.source, "removed", 0, d.doc_id))

        bar = tqdm(desc=f"ingest → {name}", unit="chunk", disable=not progress, total=None)
        done = 0

        def finish(r: FileResult) -> None:
            nonlocal done
            report.results.append(r)
            done += 1
            bar.update(r.chunks if r.status in ("added", "updated") else 0)
            bar.set_postfix_str(f"{done}/{len(files)} files", refresh=False)
            if on_file:
                on_file(r)

        batch: list[_Pending] = []

        def flush_batch() -> None:
            chunks = [c for p in batch for c in p.chunks]
            records = self._embed(chunks, "", {})
            pos = 0
            for p in batch:
                mine = records[pos:pos + len(p.chunks)]
                pos += len(p.chunks)
                for j, r in enumerate(mine):
                    r.doc_id, r.meta, r.idx = p.doc_id, dict(p.meta), j
                finish(self._commit(name, p, mine, known))
            batch.clear()

        jobs = max(1, jobs)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            # A window of files in flight: loading runs ahead of embedding without holding the whole corpus.
            futures = [pool.submit(self._read, f, known) for f in files[:2 * jobs]]
            nxt = len(futures)
            for i in range(len(files)):
                plan = futures[i].result()
                futures[i] = None
                if nxt < len(files):
                    futures.append(pool.submit(self._read, files[nxt], known))
                    nxt += 1
                if not isinstance(plan, FileResult):
                    plan = self._twin(known, plan.digest, plan.doc_id, plan.source) or plan
                if isinstance(plan, FileResult):
                    finish(plan)
                    continue
                if batch and sum(len(p.chunks) for p in batch) + len(plan.chunks) > self.batch_chunks:
                    flush_batch()
                batch.append(plan)
            if batch:
                flush_batch()
        bar.close()
        if hasattr(self.store, "flush"):
            self.store.flush()
        report.seconds = time.time() - t0
        return report
