"""API keys in SQLite: only a SHA-256 of each key is stored, with its name, scopes and per-key limits."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass

from servelm.paths import open_sqlite
from servelm.server.schemas import INT64_MAX

KEY_PREFIX = "sk-servelm-"
# "admin" implies every other scope; "rag" allows changing RAG collections (reading them needs chat or rag);
# "metrics" reads /metrics (a Prometheus scraper's key).
SCOPES = ("chat", "embeddings", "models", "rag", "metrics", "admin")
DEFAULT_SCOPES = ("chat", "embeddings", "models")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    scopes TEXT NOT NULL,
    rpm INTEGER NOT NULL DEFAULT 0,
    tpm INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


@dataclass(slots=True, frozen=True)
class KeyRecord:
    """A stored key (never the key itself). ``rpm``/``tpm`` of 0 mean unlimited."""

    id: int
    name: str
    hint: str
    scopes: tuple[str, ...]
    rpm: int
    tpm: int
    created_at: float
    revoked_at: float | None

    def allows(self, scope: str) -> bool:
        """Returns True when the key holds ``scope`` (or admin)."""
        return scope in self.scopes or "admin" in self.scopes

    def public(self) -> dict:
        """Returns the record as JSON-safe dict for listings."""
        return {"id": self.id, "name": self.name, "hint": self.hint, "scopes": list(self.scopes),
                "rpm": self.rpm, "tpm": self.tpm, "created_at": int(self.created_at),
                "revoked": self.revoked_at is not None}


def hash_key(key: str) -> str:
    """Returns the hex SHA-256 of ``key``.

    A plain hash (no salt, no bcrypt) is enough: keys are 192 random bits, so there is no
    dictionary to attack, and lookups must be fast on every request.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Returns the validated scopes from ``"chat,embeddings"`` or a list; raises ValueError naming a bad one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = tuple(dict.fromkeys(s.strip() for s in items if s.strip()))
    for s in scopes:
        if s not in SCOPES:
            raise ValueError(f"unknown scope {s!r}; choose from {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError("at least one scope is required")
    return scopes


class KeyStore:
    """The key table. Thread-safe; several processes (server replicas, the CLI) may share the file."""

    _IntegrityError = sqlite3.IntegrityError  # what a taken name raises (PgKeyStore: psycopg's)

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = open_sqlite(path, check_same_thread=False, timeout=10.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Closes the database connection."""
        with self._lock:
            self._db.close()

    def create(self, name: str, scopes=DEFAULT_SCOPES, rpm: int = 0, tpm: int = 0) -> tuple[str, KeyRecord]:
        """Returns ``(key, record)`` for a new key; the key is shown to the caller once and never stored.

        Raises ValueError for a taken name, bad scopes or limits outside 0..2**63-1 (SQLite's integers).
        """
        name = name.strip()
        if not name:
            raise ValueError("a key needs a non-empty name")
        if not (0 <= rpm <= INT64_MAX and 0 <= tpm <= INT64_MAX):
            raise ValueError(f"rpm and tpm must be between 0 (unlimited) and {INT64_MAX}")
        scopes = parse_scopes(scopes)
        key = KEY_PREFIX + secrets.token_urlsafe(24)
        hint = key[: len(KEY_PREFIX) + 4] + "..."
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO api_keys (name, key_hash, hint, scopes, rpm, tpm, created_at) VALUES (?,?,?,?,?,?,?)",
                    (name, hash_key(key), hint, ",".join(scopes), rpm, tpm, time.time()))
            except self._IntegrityError:
                raise ValueError(f"a key named {name!r} already exists") from None
        return key, self.get(name)

    def get(self, name: str) -> KeyRecord | None:
        """Returns the record named ``name`` (revoked or not), or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE name = ?", (name,)).fetchone()
        return _record(row) if row else None

    def verify(self, key: str) -> KeyRecord | None:
        """Returns the live record for ``key``, or None when unknown or revoked."""
        digest = hash_key(key)
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
                                   (digest,)).fetchone()
        # The index lookup already matched; compare_digest keeps the final check constant-time.
        if row is None or not hmac.compare_digest(row[2], digest):
            return None
        return _record(row)

    def list(self, include_revoked: bool = False) -> list[KeyRecord]:
        """Returns all records, oldest first."""
        sql = "SELECT * FROM api_keys" + ("" if include_revoked else " WHERE revoked_at IS NULL") + " ORDER BY id"
        with self._lock:
            rows = self._db.execute(sql).fetchall()
        return [_record(r) for r in rows]

    def revoke(self, name: str) -> bool:
        """Revokes the key named ``name``; returns False when there is no live key of that name."""
        with self._lock:
            cur = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                                   (time.time(), name))
        return cur.rowcount > 0

    def count(self) -> int:
        """Returns how many keys were ever created (revoked ones included)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]


def _record(row) -> KeyRecord:
    return KeyRecord(id=row[0], name=row[1], hint=row[3], scopes=tuple(row[4].split(",")), rpm=row[5],
                     tpm=row[6], created_at=row[7], revoked_at=row[8])


def open_key_store(settings) -> "KeyStore":
    """Returns the key store ``settings`` name: PostgreSQL at ``settings.pg_url`` when set (shared by replicas
    on several machines), else the SQLite file in the data directory."""
    if settings.pg_url:
        from servelm.server.keys_pg import PgKeyStore

        return PgKeyStore(settings.pg_url)
    return KeyStore(settings.keys_db)
