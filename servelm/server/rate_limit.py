"""Per-key requests/minute and tokens/minute through the ``limits`` library (memory or Redis).

Fixed one-minute windows (limits' fixed-window counters, incremented through its storage so the
response headers come from the same atomic increment that admits) with atomic counters: with Redis, every replica increments the same
counter, so N replicas admit exactly the key's budget between them. Tokens are reserved up
front (prompt + max_tokens) and the difference is given back when the request ends.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string

from servelm.server.errors import APIError


@dataclass(slots=True)
class Reservation:
    """Tokens charged to a key's current window, settled by :meth:`RateLimiter.settle`."""

    key_name: str
    tpm: int
    tokens: int
    window_end: float
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False


class RateLimiter:
    """Admits or refuses requests per key; raises :class:`APIError` 429 with ``Retry-After`` when over."""

    def __init__(self, redis_url: str | None = None, namespace: str = "servelm"):
        if redis_url:
            # limits' asyncio Redis storage speaks the "async+redis://" scheme.
            uri = redis_url if redis_url.startswith("async+") else "async+" + redis_url
            # redis-py (a declared dependency) rather than limits' default coredis driver.
            self.storage = storage_from_string(uri, key_prefix=namespace, implementation="redispy")
        else:
            self.storage = storage_from_string("async+memory://")
        self.backend = "redis" if redis_url else "memory"

    async def check_storage(self) -> bool:
        """Returns True when the backing store answers (Redis reachable)."""
        try:
            return bool(await self.storage.check())
        except Exception:
            return False

    async def _take(self, item, key_name: str, cost: int) -> tuple[bool, float, int]:
        """Atomically adds ``cost``; on refusal gives it back so refused requests use no budget.

        Returns ``(admitted, window_end_epoch, remaining)``. ``remaining`` comes from the counter value
        the same atomic increment returned (what ``FixedWindowRateLimiter.hit`` compares, here kept), so
        concurrent requests each see their own exact count; reading the counter again afterwards (the
        limiter's ``get_window_stats``) would show other requests' hits too.
        """
        key = item.key_for(key_name)
        used = await self.storage.incr(key, item.get_expiry(), amount=cost)
        ok = used <= item.amount
        if not ok:
            await self.storage.incr(key, item.get_expiry(), amount=-cost)
        reset = await self.storage.get_expiry(key)
        return ok, reset, max(0, item.amount - (used if ok else used - cost))

    async def acquire(self, key_name: str, rpm: int, tpm: int, tokens: int) -> Reservation:
        """Returns a reservation of one request and ``tokens`` tokens for ``key_name``.

        Raises APIError(429) with Retry-After and x-ratelimit-* headers when either budget is spent,
        and when ``tokens`` alone exceeds the key's tokens/minute.
        """
        headers: dict[str, str] = {}
        now = time.time()
        if rpm > 0:
            item = RateLimitItemPerMinute(rpm, namespace="rpm")
            ok, reset, remaining = await self._take(item, key_name, 1)
            headers |= {"x-ratelimit-limit-requests": str(rpm), "x-ratelimit-remaining-requests": str(remaining),
                        "x-ratelimit-reset-requests": f"{max(0.0, reset - now):.3f}s"}
            if not ok:
                raise _too_many(f"Rate limit reached for key '{key_name}': {rpm} requests per minute.",
                                "requests", reset - now, headers)
        window_end = now + 60.0
        if tpm > 0:
            if tokens > tpm:
                if rpm > 0:
                    await self._refund_request(key_name, rpm)
                raise APIError(429, f"Request too large for key '{key_name}': it needs up to {tokens} tokens "
                                    f"(prompt + max_tokens) but the limit is {tpm} tokens per minute. "
                                    "Lower max_tokens or shorten the prompt.",
                               code="tokens_per_minute_exceeded", param="max_tokens",
                               headers=headers | {"x-ratelimit-limit-tokens": str(tpm)})
            item = RateLimitItemPerMinute(tpm, namespace="tpm")
            ok, reset, remaining = await self._take(item, key_name, tokens)
            window_end = reset
            headers |= {"x-ratelimit-limit-tokens": str(tpm), "x-ratelimit-remaining-tokens": str(remaining),
                        "x-ratelimit-reset-tokens": f"{max(0.0, reset - now):.3f}s"}
            if not ok:
                if rpm > 0:
                    await self._refund_request(key_name, rpm)
                raise _too_many(f"Rate limit reached for key '{key_name}': {tpm} tokens per minute "
                                f"(this request reserves {tokens}).", "tokens", reset - now, headers)
        return Reservation(key_name, tpm, tokens if tpm > 0 else 0, window_end, headers)

    async def _refund_request(self, key_name: str, rpm: int) -> None:
        item = RateLimitItemPerMinute(rpm, namespace="rpm")
        await self.storage.incr(item.key_for(key_name), item.get_expiry(), amount=-1)

    async def settle(self, res: Reservation, used_tokens: int) -> None:
        """Corrects the reserved tokens to ``used_tokens`` (prompt + generated). Idempotent."""
        if res.settled or res.tpm <= 0:
            res.settled = True
            return
        res.settled = True
        delta = used_tokens - res.tokens
        # A refund only makes sense inside the window that was charged; a new window starts clean.
        if delta == 0 or (delta < 0 and time.time() >= res.window_end):
            return
        item = RateLimitItemPerMinute(res.tpm, namespace="tpm")
        await self.storage.incr(item.key_for(res.key_name), item.get_expiry(), amount=delta)

    async def close(self) -> None:
        """Releases the storage's connections."""
        reset = getattr(self.storage, "close", None)
        if reset is not None:
            try:
                await reset()
            except Exception:
                pass


def _too_many(message: str, what: str, retry_in: float, headers: dict[str, str]) -> APIError:
    retry = str(max(1, math.ceil(retry_in)))
    return APIError(429, message, code=f"rate_limit_{what}", headers=headers | {"Retry-After": retry})
