"""The OpenAI-compatible HTTP server: ``create_app(settings, engine)`` and the ``serve``/``keys`` CLI.

Names are imported lazily so that ``servelm keys ...`` starts without loading torch.
"""
from __future__ import annotations

__all__ = ["ChatTurn", "RequestPipeline", "ServerSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from servelm.server.app import create_app
        return create_app
    if name in ("ChatTurn", "RequestPipeline"):
        from servelm.server import pipeline
        return getattr(pipeline, name)
    if name == "ServerSettings":
        from servelm.server.settings import ServerSettings
        return ServerSettings
    raise AttributeError(name)
