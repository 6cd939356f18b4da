"""The vector-store interface both stores implement (embedded FAISS, PostgreSQL + pgvector).

A store keeps collections of documents; a document is replaced or deleted as a whole, in
one transaction, so a crash never leaves half a document. Vectors are unit vectors and
scores are cosine similarities.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from servelm.rag.schemas import Collection  # the routes' model is the stores' record too: one shape

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class NotFound(LookupError):
    """A collection or document does not exist (HTTP 404)."""


class Conflict(ValueError):
    """The request clashes with what exists, e.g. a collection name taken (HTTP 409)."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid collection name; raises ValueError saying the rule."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid collection name {name!r}: use 1-64 letters, digits, '_', '-', '.', starting with a letter or digit")
    return name


@dataclass(slots=True)
class DocumentRecord:
    doc_id: str
    source: str
    content_hash: str
    num_chunks: int = 0
    meta: dict = field(default_factory=dict)
    created: float = 0.0


@dataclass(slots=True)
class ChunkRecord:
    """One stored chunk. ``sent_spans`` are sentence offsets inside ``text``, ``sent_vecs``
    their embeddings (float16), used by the sentence-level re-ranker and for snippets."""

    doc_id: str
    source: str
    text: str
    start: int
    end: int
    page: int | None = None
    idx: int = 0
    meta: dict = field(default_factory=dict)
    vector: np.ndarray | None = None
    sent_spans: list = field(default_factory=list)
    sent_vecs: np.ndarray | None = None
    id: int = 0


def pack_f16(a: np.ndarray | None) -> bytes | None:
    """Return the bytes of ``a`` as float16 (None stays None)."""
    return None if a is None else np.ascontiguousarray(a, dtype=np.float16).tobytes()


def unpack_f16(b, dim: int) -> np.ndarray | None:
    """Return a ``(-1, dim)`` float32 array from float16 bytes (None stays None)."""
    return None if b is None else np.frombuffer(bytes(b), dtype=np.float16).reshape(-1, dim).astype(np.float32)


def check_vectors(chunks: list[ChunkRecord], dim: int) -> None:
    """Raise ValueError unless every chunk has a ``(dim,)`` vector (checked before a store writes)."""
    for c in chunks:
        if c.vector is None or c.vector.shape != (dim,):
            raise ValueError(f"chunk vector must have shape ({dim},)")


class VectorStore(ABC):
    """Collections of documents and their chunk vectors."""

    @abstractmethod
    def create_collection(self, name: str, dim: int, model: str) -> Collection:
        """Create a collection; raises Conflict if it exists, ValueError for a bad name."""

    @abstractmethod
    def get_collection(self, name: str) -> Collection:
        """Return a collection's info with counts; raises NotFound."""

    @abstractmethod
    def list_collections(self) -> list[Collection]:
        """Return every collection, sorted by name."""

    @abstractmethod
    def delete_collection(self, name: str) -> None:
        """Delete a collection with its documents and vectors; raises NotFound."""

    @abstractmethod
    def list_documents(self, name: str) -> list[DocumentRecord]:
        """Return the documents of a collection sorted by source; raises NotFound."""

    @abstractmethod
    def replace_document(self, name: str, doc: DocumentRecord, chunks: list[ChunkRecord]) -> None:
        """Atomically replace ``doc.doc_id``'s chunks (insert if new); raises NotFound."""

    @abstractmethod
    def delete_document(self, name: str, doc_id: str) -> None:
        """Atomically delete a document and its vectors; raises NotFound."""

    @abstractmethod
    def search(self, name: str, vector: np.ndarray, k: int, where: dict | None = None) -> list[tuple[int, float]]:
        """Return up to ``k`` ``(chunk_id, cosine)`` pairs, best first, among chunks matching ``where``.

        ``where`` maps ``doc_id``/``source``/``page`` or a metadata key to a value or a list of values.
        """

    @abstractmethod
    def filter_ids(self, name: str, where: dict) -> set[int]:
        """Return the ids of the chunks matching ``where``."""

    @abstractmethod
    def get_chunks(self, name: str, ids: list[int], vectors: bool = False) -> list[ChunkRecord]:
        """Return the chunks with these ids, in the same order (missing ids are skipped)."""

    @abstractmethod
    def all_texts(self, name: str) -> tuple[list[int], list[str]]:
        """Return ``(ids, texts)`` of every chunk (to build the BM25 index)."""

    @abstractmethod
    def version(self, name: str) -> int:
        """Return a number that changes whenever the collection's content changes."""

    def close(self) -> None:
        """Flush and release resources."""
