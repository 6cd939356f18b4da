"""The server's shared state, kept on ``app.state.servelm`` for routes and dependencies."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from servelm.server.admission import Admission
from servelm.server.errors import APIError
from servelm.server.keys import KeyStore
from servelm.server.metrics import Metrics
from servelm.serving.pipeline import RequestPipeline
from servelm.server.rate_limit import RateLimiter
from servelm.server.settings import ServerSettings


@dataclass(slots=True)
class ServerContext:
    """Everything a request handler needs: engine, settings, keys, limiter, admission, metrics, pipeline."""

    settings: ServerSettings
    engine: Any  # servelm.engine.AsyncEngine
    keys: KeyStore | None
    limiter: RateLimiter
    admission: Admission
    metrics: Metrics
    pipeline: RequestPipeline
    guarding: Any = None  # servelm.serving.guard.Guarding: guard, engine fallback, default strategy
    embedder: Any = None  # servelm.server.embedder.Embedder, when an embedding model is configured
    rag: Any = None  # servelm.rag.RagService, when RAG is on
    ready: bool = False

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    @property
    def model_name(self) -> str:
        """Returns the name clients pass as ``model``."""
        return self.settings.served_model_name or self.engine.model_name

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The served tokenizer's special and added tokens (chat-template markers, for the prompt guard)."""
        hf = self.engine.tokenizer.hf
        return tuple({*hf.all_special_tokens, *(str(t) for t in hf.get_added_vocab())})

    def check_model(self, name: str | None) -> None:
        """Raises APIError(404) when ``name`` is given and is not the served chat model."""
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}' "
                                "(see GET /v1/models).", param="model", code="model_not_found")


def get_context(request: Request) -> ServerContext:
    """Returns the app's :class:`ServerContext`."""
    return request.app.state.servelm
