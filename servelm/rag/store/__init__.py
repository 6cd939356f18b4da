"""Vector stores behind one interface: embedded FAISS + SQLite, and PostgreSQL + pgvector."""
from servelm.rag.store.base import ChunkRecord, CollectionInfo, Conflict, DocumentRecord, NotFound, VectorStore

__all__ = ["ChunkRecord", "CollectionInfo", "Conflict", "DocumentRecord", "NotFound", "VectorStore"]
