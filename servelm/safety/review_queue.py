"""Human-in-the-loop review queue, persisted in SQLite.

Flagged requests or responses are stored with status ``pending``; a reviewer approves
(optionally with edited text), rejects, or edits. An approved answer can be fetched by
its review id. Every state change is appended to the ``audit`` table.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from servelm.paths import open_sqlite

STATUSES = ("pending", "approved", "rejected")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
  id TEXT PRIMARY KEY, request_id TEXT, stage TEXT NOT NULL, scanner TEXT NOT NULL, reason TEXT,
  prompt TEXT, response TEXT, final_text TEXT, status TEXT NOT NULL DEFAULT 'pending',
  api_key_id TEXT, created_at REAL NOT NULL, decided_at REAL, reviewer TEXT);
CREATE INDEX IF NOT EXISTS reviews_status ON reviews(status, created_at);
CREATE TABLE IF NOT EXISTS audit (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, review_id TEXT NOT NULL, action TEXT NOT NULL,
  actor TEXT, at REAL NOT NULL, detail TEXT);
"""


class ReviewError(ValueError):
    """Unknown review id or a transition that is not allowed (maps to HTTP 404/409)."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(slots=True)
class ReviewItem:
    id: str
    request_id: str | None
    stage: str  # "input" or "output"
    scanner: str
    reason: str
    prompt: str | None
    response: str | None
    final_text: str | None
    status: str
    api_key_id: str | None
    created_at: float
    decided_at: float | None
    reviewer: str | None


class ReviewQueue:
    """A SQLite-backed queue; safe to share between threads; reopening the file restores it."""

    def __init__(self, path: str | Path, on_depth=None):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = open_sqlite(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._on_depth = on_depth
        self._report_depth()

    def close(self) -> None:
        """Close the database file."""
        self._db.close()

    def _report_depth(self) -> None:
        if self._on_depth:
            self._on_depth(self.depth())

    def _audit(self, review_id: str, action: str, actor: str | None, detail: str = "") -> None:
        self._db.execute("INSERT INTO audit(review_id, action, actor, at, detail) VALUES (?,?,?,?,?)",
                         (review_id, action, actor, time.time(), detail))

    def submit(self, *, stage: str, scanner: str, reason: str, prompt: str | None = None,
               response: str | None = None, request_id: str | None = None, api_key_id: str | None = None) -> str:
        """Queue a flagged item; return its review id."""
        rid = "rev_" + uuid.uuid4().hex[:20]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO reviews(id, request_id, stage, scanner, reason, prompt, response, status,"
                " api_key_id, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (rid, request_id, stage, scanner, reason, prompt, response, "pending", api_key_id, time.time()))
            self._audit(rid, "submitted", "guard", f"{scanner}: {reason}")
            self._db.execute("COMMIT")
        self._report_depth()
        return rid

    def get(self, review_id: str) -> ReviewItem:
        """Return the item ``review_id``; raises :class:`ReviewError` (404) if unknown."""
        row = self._db.execute("SELECT id, request_id, stage, scanner, reason, prompt, response, final_text,"
                               " status, api_key_id, created_at, decided_at, reviewer FROM reviews WHERE id=?",
                               (review_id,)).fetchone()
        if row is None:
            raise ReviewError(f"review {review_id!r} not found")
        return ReviewItem(*row)

    def list(self, status: str | None = "pending", limit: int = 100, offset: int = 0) -> list[ReviewItem]:
        """Return items with ``status`` (None = all), oldest first."""
        if status is not None and status not in STATUSES:
            raise ReviewError(f"status must be one of {STATUSES}", status=400)
        where, args = ("WHERE status=?", (status,)) if status else ("", ())
        ids = self._db.execute(f"SELECT id FROM reviews {where} ORDER BY created_at LIMIT ? OFFSET ?",
                               (*args, limit, offset)).fetchall()
        return [self.get(i) for (i,) in ids]

    def depth(self) -> int:
        """Return how many items are pending."""
        return self._db.execute("SELECT COUNT(*) FROM reviews WHERE status='pending'").fetchone()[0]

    def _decide(self, review_id: str, status: str, reviewer: str, text: str | None, action: str) -> ReviewItem:
        with self._lock:
            item = self.get(review_id)
            if item.status != "pending":
                raise ReviewError(f"review {review_id} is already {item.status}", status=409)
            final = text if text is not None else (item.response if item.stage == "output" else None)
            self._db.execute("BEGIN")
            self._db.execute("UPDATE reviews SET status=?, final_text=?, decided_at=?, reviewer=? WHERE id=?",
                             (status, final if status == "approved" else None, time.time(), reviewer, review_id))
            self._audit(review_id, action, reviewer, "edited" if text is not None else "")
            self._db.execute("COMMIT")
        self._report_depth()
        return self.get(review_id)

    def approve(self, review_id: str, reviewer: str, text: str | None = None) -> ReviewItem:
        """Approve; the held answer (or ``text`` if given) becomes fetchable. Raises ReviewError."""
        return self._decide(review_id, "approved", reviewer, text, "approved")

    def reject(self, review_id: str, reviewer: str) -> ReviewItem:
        """Reject; nothing will be released. Raises ReviewError."""
        return self._decide(review_id, "rejected", reviewer, None, "rejected")

    def edit(self, review_id: str, reviewer: str, text: str) -> ReviewItem:
        """Replace the held response with ``text`` while still pending. Raises ReviewError."""
        with self._lock:
            item = self.get(review_id)
            if item.status != "pending":
                raise ReviewError(f"review {review_id} is already {item.status}", status=409)
            self._db.execute("BEGIN")
            self._db.execute("UPDATE reviews SET response=? WHERE id=?", (text, review_id))
            self._audit(review_id, "edited", reviewer, f"{len(text)} chars")
            self._db.execute("COMMIT")
        return self.get(review_id)

    def approved_answer(self, review_id: str) -> str | None:
        """Return the released answer, or None while pending; raises ReviewError if rejected/unknown."""
        item = self.get(review_id)
        if item.status == "rejected":
            raise ReviewError(f"review {review_id} was rejected", status=409)
        return item.final_text if item.status == "approved" else None

    def audit_log(self, review_id: str | None = None) -> list[dict]:
        """Return audit entries (all, or for one review), oldest first."""
        q = "SELECT seq, review_id, action, actor, at, detail FROM audit"
        rows = self._db.execute(q + (" WHERE review_id=? ORDER BY seq" if review_id else " ORDER BY seq"),
                                (review_id,) if review_id else ()).fetchall()
        return [dict(zip(("seq", "review_id", "action", "actor", "at", "detail"), r)) for r in rows]


def open_review_queue(where: str | Path, on_depth=None) -> ReviewQueue:
    """Returns the review queue at ``where``: a ``postgresql://`` URL (shared by replicas on several
    machines) or a SQLite file."""
    if str(where).startswith(("postgresql://", "postgres://")):
        from servelm.safety.review_queue_pg import PgReviewQueue

        return PgReviewQueue(str(where), on_depth)
    return ReviewQueue(where, on_depth)
