"""Prometheus metrics and structured JSON log lines for guard decisions and degradation.

Metrics live in the default ``prometheus_client`` registry unless a registry is passed
(tests pass their own), so the server's ``/metrics`` exposes them with no extra wiring.
"""
from __future__ import annotations

import json
import logging
import time
import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("servelm.safety")


class GuardMetrics:
    """The guard's Prometheus series, registered once per registry."""

    # Keyed by the registry object itself (weakly): an id() key could be reused by a new registry
    # after the old one is collected, handing it series registered elsewhere.
    _by_registry: "weakref.WeakKeyDictionary[CollectorRegistry, GuardMetrics]" = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry):
        self.decisions = Counter("servelm_guard_decisions_total", "Guard decisions by scanner and action",
                                 ["stage", "scanner", "action"], registry=registry)
        self.scanner_errors = Counter("servelm_guard_scanner_errors_total", "Scanners that raised",
                                      ["scanner", "fail_mode"], registry=registry)
        self.latency = Histogram("servelm_guard_latency_seconds", "Guard latency per check", ["stage"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0),
                                 registry=registry)
        self.review_depth = Gauge("servelm_review_queue_depth", "Items pending human review",
                                  registry=registry)
        self.fallbacks = Counter("servelm_fallbacks_total", "Answers given by a fallback",
                                 ["reason", "kind"], registry=registry)
        self.breaker_state = Gauge("servelm_circuit_breaker_open", "1 while the engine breaker is open",
                                   ["name"], registry=registry)

    @classmethod
    def get(cls, registry: CollectorRegistry | None = None) -> "GuardMetrics":
        """Return the metrics bound to ``registry`` (default: the global one), creating them once."""
        registry = registry or REGISTRY
        if registry not in cls._by_registry:
            cls._by_registry[registry] = cls(registry)
        return cls._by_registry[registry]


def log_event(event: str, request_id: str | None = None, level: int = logging.INFO, **fields) -> dict:
    """Log one JSON line ``{"ts", "event", "request_id", ...fields}`` and return it as a dict."""
    record = {"ts": round(time.time(), 3), "event": event, "request_id": request_id, **fields}
    log.log(level, json.dumps(record, default=str, ensure_ascii=False))
    return record
