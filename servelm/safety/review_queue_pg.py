"""The review queue in PostgreSQL (``--pg-url``): :class:`~servelm.safety.review_queue.ReviewQueue`'s tables
and queries on a database the replicas of several machines share."""
from __future__ import annotations

import threading

from servelm.safety.review_queue import ReviewQueue
from servelm.shared_db import PgConnection

# Version i + 1 is MIGRATIONS[i]: append, never edit.
MIGRATIONS = ["""
CREATE TABLE IF NOT EXISTS reviews (
  id TEXT PRIMARY KEY, request_id TEXT, stage TEXT NOT NULL, scanner TEXT NOT NULL, reason TEXT,
  prompt TEXT, response TEXT, final_text TEXT, status TEXT NOT NULL DEFAULT 'pending',
  api_key_id TEXT, created_at DOUBLE PRECISION NOT NULL, decided_at DOUBLE PRECISION, reviewer TEXT);
CREATE INDEX IF NOT EXISTS reviews_status ON reviews(status, created_at);
CREATE TABLE IF NOT EXISTS audit (
  seq BIGSERIAL PRIMARY KEY, review_id TEXT NOT NULL, action TEXT NOT NULL,
  actor TEXT, at DOUBLE PRECISION NOT NULL, detail TEXT);
"""]


class PgReviewQueue(ReviewQueue):
    """:class:`ReviewQueue` on PostgreSQL at ``url``; the same methods, items and errors."""

    def __init__(self, url: str, on_depth=None):
        self.path = "postgresql"  # never the URL: it may hold a password
        self._db = PgConnection(url)
        self._db.migrate("reviews", MIGRATIONS)
        self._lock = threading.Lock()
        self._on_depth = on_depth
        self._report_depth()
