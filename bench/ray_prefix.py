"""Prefix-aware routing against Ray Serve's default router, in one run: two engine replicas of the embedded
model on a local Ray cluster, the same requests through each router (``--request-router``).

Prints JSON: per router, the replicas' prefix-cache hit rate (prompt tokens found in a KV cache / prompt
tokens looked up, from /metrics) and the time to first token (p50, p90) of streamed chat completions that
each open with one of ``--prompts`` distinct system prompts of about ``--system-tokens`` tokens.

    HF_HUB_OFFLINE=1 python bench/ray_prefix.py                   # 8 prompts x 64 requests, 2 replicas
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import re
import socket
import statistics
import sys
import time

import httpx

# this checkout's servelm, for this process and for the Ray workers it starts (they inherit PYTHONPATH)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("router switch console cloud tenant policy uplink firmware backup latency region quota invoice "
         "warranty ticket escalation subnet gateway license cluster replica snapshot audit token").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_prompts(url: str, model: str, count: int, tokens: int) -> list[str]:
    """Returns ``count`` system prompts, distinct from their first words, each about ``tokens`` tokens long
    (measured with the server's /tokenize)."""
    out = []
    for k in range(count):
        rng = random.Random(k)
        words = [f"Profile {k}: you answer for business unit {k * 7919 % 1000}."]
        text = ""
        while True:
            words.append(" ".join(rng.choice(WORDS) for _ in range(40)) + ".")
            text = " ".join(words)
            n = httpx.post(url + "/tokenize", json={"model": model, "prompt": text}, timeout=60).json()["count"]
            if n >= tokens:
                break
        out.append(text)
    return out


def metric_sum(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=60).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def run_requests(url: str, model: str, prompts: list[str], per_prompt: int, concurrency: int,
                       max_tokens: int) -> list[float]:
    """Returns the time to first token of each request, in seconds."""
    jobs = [(k, i) for i in range(per_prompt) for k in range(len(prompts))]
    random.Random(0).shuffle(jobs)
    gate = asyncio.Semaphore(concurrency)

    async def one(h, k, i):
        body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                "messages": [{"role": "system", "content": prompts[k]},
                             {"role": "user", "content": f"Question {i}: how do I renew my licence?"}]}
        async with gate:
            start = time.perf_counter()
            async with h.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                lines = r.aiter_lines()
                async for line in lines:
                    if line.startswith("data: ") and '"content"' in line:
                        first = time.perf_counter() - start
                        async for _ in lines:
                            pass
                        return first
        raise RuntimeError("a stream ended without content")

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as h:
        return await asyncio.gather(*[one(h, k, i) for k, i in jobs])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--requests-per-prompt", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--replica-num-cpus", type=float, default=0.5)
    # Room for about five of the 1,500-token system prompts per replica (float32 KV on the CPU, ~46 KB a token
    # for SmolLM2-135M): affinity gives each replica four of the eight, the default router all eight.
    p.add_argument("--kv-cache-memory-bytes", type=int, default=384 * 1024 * 1024)
    p.add_argument("--routers", default="prefix_cache_affinity,power_of_two")
    args = p.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from servelm.deploy.ray_serve import APP_NAME, build_app
    from servelm.engine import EngineConfig
    from servelm.server.cli import engine_settings
    from servelm.server.settings import ServerSettings

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=max(os.cpu_count() or 1, int(args.replicas * args.replica_num_cpus) + 2),
             include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    result = {"bench": "ray_prefix", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_start": os.getloadavg()[0],
              "replicas": args.replicas, "prompts": args.prompts, "requests_per_prompt": args.requests_per_prompt,
              "system_tokens": args.system_tokens, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "kv_cache_memory_bytes": args.kv_cache_memory_bytes, "routers": {}}
    prompts = None
    for router in args.routers.split(","):
        settings = ServerSettings(replicas=args.replicas, replica_num_cpus=args.replica_num_cpus, no_auth=True,
                                  no_guard=True, rag=False, embedding_model=None, metrics_auth=False,
                                  request_router=router, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                                  data_dir=f"/tmp/servelm-bench-ray-{port}", log_level="warning")
        started = time.perf_counter()
        serve.run(build_app(settings, EngineConfig(model=settings.model, **engine_settings(settings))),
                  name=APP_NAME, route_prefix="/")
        while httpx.get(url + "/ready", timeout=10).status_code != 200:
            time.sleep(0.5)
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        if prompts is None:
            prompts = system_prompts(url, model, args.prompts, args.system_tokens)
        ready_s = time.perf_counter() - started
        began = time.perf_counter()
        ttft = asyncio.run(run_requests(url, model, prompts, args.requests_per_prompt, args.concurrency,
                                        args.max_tokens))
        wall = time.perf_counter() - began
        hits = metric_sum(url, "servelm:prefix_cache_hits_total")
        queries = metric_sum(url, "servelm:prefix_cache_queries_total")
        per_replica = {}
        text = httpx.get(url + "/metrics", timeout=60).text
        for m in re.finditer(r'^servelm:replica_requests_total{replica="([^"]+)"} (\S+)$', text, re.M):
            per_replica[m.group(1)] = float(m.group(2))
        q = statistics.quantiles(ttft, n=10)
        result["routers"][router] = {
            "prefix_cache_hit_rate": round(hits / max(queries, 1), 4), "ttft_p50_s": round(statistics.median(ttft), 4),
            "ttft_p90_s": round(q[8], 4), "wall_s": round(wall, 1), "requests": len(ttft),
            "requests_per_replica": sorted(per_replica.values()), "startup_s": round(ready_s, 1)}
        serve.delete(APP_NAME)
    names = list(result["routers"])
    if len(names) == 2:
        a, b = (result["routers"][n] for n in names)
        result[f"ttft_p50_{names[1]}_over_{names[0]}"] = round(b["ttft_p50_s"] / max(a["ttft_p50_s"], 1e-9), 2)
    result["load_avg_end"] = os.getloadavg()[0]
    serve.shutdown()
    ray.shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
