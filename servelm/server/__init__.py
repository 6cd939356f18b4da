"""The OpenAI-compatible HTTP server: ``create_app(settings, engine)`` and the ``serve``/``keys`` CLI."""
from servelm.server.app import create_app
from servelm.server.pipeline import ChatTurn, RequestPipeline
from servelm.server.settings import ServerSettings

__all__ = ["ChatTurn", "RequestPipeline", "ServerSettings", "create_app"]
