"""Where servelm keeps its files by default (the server, ``servelm ingest`` and the RAG library agree)."""
from __future__ import annotations

import os


def default_data_dir() -> str:
    """Returns ``$SERVELM_DATA_DIR``, else ``$XDG_DATA_HOME/servelm`` (``~/.local/share/servelm``)."""
    if os.environ.get("SERVELM_DATA_DIR"):
        return os.environ["SERVELM_DATA_DIR"]
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "servelm")


def default_rag_dir(data_dir: str | None = None) -> str:
    """Returns where RAG collections live: ``<data_dir>/rag`` (``data_dir`` defaults as above)."""
    return os.path.join(data_dir or default_data_dir(), "rag")
