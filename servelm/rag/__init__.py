"""Retrieval-augmented generation: ingest, split, embed, store, retrieve, re-rank, answer with citations."""
from servelm.rag.config import RagConfig
from servelm.rag.service import BadDocument, RagService, http_status

__all__ = ["BadDocument", "RagConfig", "RagService", "http_status"]
