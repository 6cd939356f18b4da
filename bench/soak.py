"""Soak a running servelm with generated requests: the long version of tests/test_server_fuzz.py.

Cases come from the server's own /openapi.json (schemathesis strategies, one operation after another,
round robin), ``--concurrency`` in flight at once, until ``--max-cases`` or ``--max-seconds``. Prints
JSON: cases sent, status counts per operation, and the first 5xx answers (method, path, status, body
start). Loopback servers only: this sends arbitrary, also destructive, admin requests with the key
it is given.

    python bench/soak.py --base-url http://127.0.0.1:8000 --api-key sk-servelm-... --max-cases 5000
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import sys
import time
import warnings
from urllib.parse import urlsplit

import httpx


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cases(schema):
    """Yields schemathesis cases forever, one operation after another."""
    from hypothesis import errors

    warnings.simplefilter("ignore", errors.NonInteractiveExampleWarning)
    ops = [r.ok() for r in schema.get_all_operations() if r.ok() is not None]
    strategies = [(op, op.as_strategy()) for op in ops]
    while True:
        for op, strategy in strategies:
            try:
                yield op, strategy.example()
            except Exception:  # an operation hypothesis cannot generate for: skip it this round
                continue


async def soak(args) -> dict:
    import schemathesis

    # fetched here, with the soak's own timeout: a busy server may take a while to answer
    spec = httpx.get(args.base_url.rstrip("/") + "/openapi.json", timeout=args.timeout).raise_for_status().json()
    schema = schemathesis.openapi.from_dict(spec)
    stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    errors: list[dict] = []
    sent = 0
    start = time.monotonic()
    cases = _cases(schema)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, limits=limits, headers=headers) as h:

        async def worker():
            nonlocal sent
            while sent < args.max_cases and time.monotonic() - start < args.max_seconds:
                op, case = next(cases)
                sent += 1
                kw = case.as_transport_kwargs(base_url=args.base_url)
                name = f"{op.method.upper()} {op.path}"
                try:
                    r = await h.request(kw["method"], kw["url"], params=kw.get("params"), json=kw.get("json"),
                                        content=kw.get("data") if isinstance(kw.get("data"), (bytes, str)) else None,
                                        headers={**headers, **(kw.get("headers") or {})})
                    status = r.status_code
                    if status >= 500 and len(errors) < 20:
                        errors.append({"operation": name, "status": status, "body": r.text[:300]})
                except httpx.HTTPError as e:
                    status = type(e).__name__
                stats[name][str(status)] += 1

        await asyncio.gather(*[worker() for _ in range(args.concurrency)])
    elapsed = time.monotonic() - start
    server_errors = sum(n for c in stats.values() for s, n in c.items() if s.isdigit() and int(s) >= 500)
    return {"base_url": args.base_url, "cases": sent, "seconds": round(elapsed, 1),
            "cases_per_s": round(sent / elapsed, 2) if elapsed else None, "server_errors": server_errors,
            "statuses": {k: dict(v) for k, v in sorted(stats.items())}, "first_server_errors": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="An admin key (so every route is reachable).")
    p.add_argument("--max-cases", type=int, default=2000)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0, help="Seconds per request.")
    args = p.parse_args(argv)
    if not _loopback(args.base_url):
        sys.exit("bench/soak.py: only loopback servers (127.0.0.1, ::1, localhost): it sends destructive requests")
    print(json.dumps(asyncio.run(soak(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
