"""Backpressure: a bounded number of admitted requests, and a draining flag for graceful shutdown."""
from __future__ import annotations

from servelm.server.errors import APIError


class Admission:
    """Counts generation requests in flight; refuses beyond ``running + queue`` with a fast 503.

    The engine runs ``max_running`` at once; ``max_queue`` more may wait. Refusing at the door
    (instead of queueing without bound) keeps latency for admitted requests predictable and tells
    clients and load balancers to retry elsewhere.
    """

    def __init__(self, max_running: int, max_queue: int):
        self.capacity = max_running + max_queue
        self.inflight = 0
        self.draining = False

    def enter(self) -> None:
        """Admits one request. Raises APIError(503) with Retry-After when full or shutting down."""
        if self.draining:
            raise APIError(503, "The server is shutting down; retry on another replica.",
                           code="shutting_down", headers={"Retry-After": "5"})
        if self.inflight >= self.capacity:
            raise APIError(503, f"The server is overloaded ({self.inflight} requests in flight, "
                                f"limit {self.capacity}); retry shortly.",
                           code="server_overloaded", headers={"Retry-After": "1"})
        self.inflight += 1

    def leave(self) -> None:
        """Releases one admitted request."""
        self.inflight = max(0, self.inflight - 1)
