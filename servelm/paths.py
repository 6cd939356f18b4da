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


def open_sqlite(path: str, **kwargs) -> "sqlite3.Connection":
    """Returns ``sqlite3.connect(path, **kwargs)`` on a database file only its owner can read (0600).

    The file is created 0600 before SQLite opens it, because SQLite gives the ``-wal`` and ``-shm``
    files it creates beside a database the database file's mode: so they are 0600 too (the key
    store's WAL holds key hashes). Files an older version created with wider modes are narrowed.
    ``":memory:"`` passes straight through.
    """
    import sqlite3

    if path != ":memory:" and not str(path).startswith("file:"):
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        for name in (path, f"{path}-wal", f"{path}-shm", f"{path}-journal"):
            try:
                os.chmod(name, 0o600)
            except FileNotFoundError:
                pass
    return sqlite3.connect(path, **kwargs)
