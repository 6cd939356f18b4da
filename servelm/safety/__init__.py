"""Guardrails: input/output scanners, policy, human review, graceful degradation, metrics.

The server needs only :class:`Guard` (``guard.py``) plus, for degradation,
:class:`ResilientCaller` with its fallbacks (``fallback.py``).
"""
from servelm.safety.circuit_breaker import BreakerConfig, CircuitBreaker, CircuitOpenError, OverloadedError
from servelm.safety.fallback import CachedFallback, FallbackResult, ModelFallback, ResilientCaller, StaticFallback
from servelm.safety.guard import Decision, Finding, Guard, GuardedStream
from servelm.safety.policy import Policy, PolicyError, ScannerPolicy
from servelm.safety.review_queue import ReviewError, ReviewItem, ReviewQueue

__all__ = [
    "BreakerConfig", "CachedFallback", "CircuitBreaker", "CircuitOpenError", "Decision", "FallbackResult",
    "Finding", "Guard", "GuardedStream", "ModelFallback", "OverloadedError", "Policy", "PolicyError",
    "ResilientCaller", "ReviewError", "ReviewItem", "ReviewQueue", "ScannerPolicy", "StaticFallback",
]
