"""Vector stores behind one interface: embedded FAISS + SQLite, and PostgreSQL + pgvector."""
from servelm.rag.store.base import ChunkRecord, Conflict, DocumentRecord, NotFound, VectorStore

__all__ = ["ChunkRecord", "Conflict", "DocumentRecord", "NotFound", "VectorStore"]
