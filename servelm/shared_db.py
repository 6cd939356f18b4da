"""PostgreSQL for the state replicas share (API keys, the review queue), behind the small part of
``sqlite3``'s connection API those stores use, so each store keeps one set of queries for both databases.

Only ``execute(sql, args)`` (with ``?`` placeholders, as SQLite writes them) and the cursor's ``fetchone``,
``fetchall`` and ``rowcount`` are offered: psycopg has no ``?`` paramstyle, and translating the one
placeholder is smaller than a second copy of every query. Schemas change through numbered migrations,
applied once under an advisory lock so that replicas starting together do not race.
"""
from __future__ import annotations

import psycopg

IntegrityError = psycopg.IntegrityError


class PgConnection:
    """One autocommit psycopg connection; psycopg serializes its use between threads. Explicit
    ``BEGIN``/``COMMIT`` statements group writes into a transaction, as on SQLite."""

    def __init__(self, url: str):
        self._conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, args: tuple = ()):
        """Returns the cursor of ``sql`` run with ``args``; ``?`` marks a parameter."""
        return self._conn.execute(sql.replace("?", "%s"), args)

    def migrate(self, component: str, migrations: list[str]) -> None:
        """Applies the migrations of ``component`` not applied yet, in order, each in its own transaction.

        ``migrations[i]`` is the SQL of version i + 1; add new versions at the end and never edit old ones."""
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(hashtext('servelm_migrations'))")
            self._conn.execute("CREATE TABLE IF NOT EXISTS servelm_migrations (component TEXT NOT NULL, "
                               "version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
                               "PRIMARY KEY (component, version))")
            row = self._conn.execute("SELECT COALESCE(MAX(version), 0) FROM servelm_migrations WHERE component = %s",
                                     (component,)).fetchone()
            for version, sql in enumerate(migrations[row[0]:], start=row[0] + 1):
                self._conn.execute(sql)
                self._conn.execute("INSERT INTO servelm_migrations (component, version) VALUES (%s, %s)",
                                   (component, version))

    def close(self) -> None:
        self._conn.close()
