"""API keys in PostgreSQL (``--pg-url``): the key table of :mod:`servelm.server.keys`, shared by replicas on
several machines. Every request looks its key up, so a key revoked on one replica is refused by all of them
from the next request on."""
from __future__ import annotations

import threading

from servelm.server.keys import KeyStore
from servelm.shared_db import IntegrityError, PgConnection

# Version i + 1 is MIGRATIONS[i]: append, never edit.
MIGRATIONS = ["""
CREATE TABLE IF NOT EXISTS api_keys (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    scopes TEXT NOT NULL,
    rpm BIGINT NOT NULL DEFAULT 0,
    tpm BIGINT NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
"""]


class PgKeyStore(KeyStore):
    """:class:`KeyStore` on PostgreSQL at ``url``; the same methods, records and errors."""

    _IntegrityError = IntegrityError

    def __init__(self, url: str):
        self.path = "postgresql"  # never the URL: it may hold a password
        self._lock = threading.Lock()
        self._db = PgConnection(url)
        self._db.migrate("api_keys", MIGRATIONS)
