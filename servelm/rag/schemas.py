"""Pydantic v2 request/response models of the RAG routes (the server uses them as-is)."""
from __future__ import annotations

from pydantic import BaseModel, Field


class CollectionCreate(BaseModel):
    """Body of ``POST /v1/collections``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="1-64 letters, digits, '_', '-', '.'")


class Collection(BaseModel):
    """A collection: the stores' record and the body of ``GET/POST /v1/collections[/{name}]``."""

    object: str = "collection"
    name: str
    dim: int
    model: str
    created: float
    num_documents: int = 0
    num_chunks: int = 0


class CollectionList(BaseModel):
    """Response of ``GET /v1/collections``."""

    object: str = "list"
    data: list[Collection]


class Deleted(BaseModel):
    """Response of ``DELETE /v1/collections/{name}``."""

    name: str
    object: str = "collection"
    deleted: bool = True


class DocumentResult(BaseModel):
    """Response of ``POST /v1/collections/{name}/documents``: what happened to the upload."""

    source: str
    status: str = Field(description="added, updated, unchanged, duplicate or error")
    chunks: int = 0
    doc_id: str = ""
    error: str | None = None


class RagQueryRequest(BaseModel):
    """Body of ``POST /v1/rag/query``."""

    collection: str
    query: str = Field(min_length=1)
    k: int = Field(default=5, ge=1, le=50)
    filters: dict[str, str | int | float | list[str | int | float]] | None = None
    mmr: bool | None = None
    min_relevance: float | None = Field(default=None, ge=0, le=1, description=(
        "cosine relevance a chunk needs to be used (default: the deployment's relevance_threshold, 0.3); "
        "raise it to answer 'not in the documents' rather than from loosely related chunks"))
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)


class Source(BaseModel):
    index: int = Field(description="the [n] used in the answer")
    source: str
    page: int | None = None
    start: int = Field(description="chunk start offset in the document's text")
    end: int
    snippet: str = Field(description="the chunk sentence that best matches the query")
    score: float = Field(description="cosine relevance of the chunk to the query")
    chunk_id: int


class RagQueryResponse(BaseModel):
    """Response of ``POST /v1/rag/query`` (and the last event of a stream)."""

    answer: str
    sources: list[Source]
    found: bool = Field(description="false when no chunk passed the relevance threshold")
    finish_reason: str | None = Field(default=None, description='"content_filter" when the guard stopped or held the answer')
    servelm: dict | None = Field(default=None, description="the guard's note: {content_filter} or {review_id, status}")


class RagStreamDelta(BaseModel):
    """One streamed event of ``POST /v1/rag/query`` with ``stream: true``, before the final response."""

    delta: str


class RagOptions(BaseModel):
    """The ``rag`` field accepted on chat completions."""

    collection: str
    k: int = Field(default=5, ge=1, le=50)
    filters: dict[str, str | int | float | list[str | int | float]] | None = None
    min_relevance: float | None = Field(default=None, ge=0, le=1, description=(
        "cosine relevance a chunk needs to be used (default: the deployment's relevance_threshold, 0.3); "
        "raise it to answer 'not in the documents' rather than from loosely related chunks"))
