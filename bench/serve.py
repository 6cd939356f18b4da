"""Online serving benchmark for any OpenAI-compatible server, in the manner of vLLM's benchmark_serving.

Requests arrive open-loop as a Poisson process at ``--request-rate`` (``inf`` sends all at once),
each streamed; we time the first token (TTFT), the gaps between tokens (ITL), time per output token
after the first (TPOT) and end-to-end latency, and report mean/p50/p99, throughput and goodput
(requests/s meeting every SLO given) as JSON.

    python bench/serve.py --base-url http://127.0.0.1:8000 --api-key sk-... \
        --num-prompts 64 --request-rate 2 --dataset random --input-len 128 --output-len 64

Guarded vs unguarded: ``--unguarded-base-url`` names a second server of the same model started with
``--no-guard``; the same workload then runs against both, alternating request by request so both see the same
machine load, and the report has ``guarded``, ``unguarded`` and ``guard_ttft_ratio``. ``chunks_per_answer``
counts the chunks that carried text: an output guard that holds text back sends fewer, larger ones.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact be have do say get make go know take see come think look "
          "want give use find tell ask seem feel try leave call good new first last long great little own other "
          "old right big high different small large next early young important few public bad same able").split()


@dataclass(slots=True)
class RequestSpec:
    prompt: str
    prompt_words: int
    output_len: int


@dataclass(slots=True)
class Result:
    ok: bool
    status: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunks: int = 0  # chunks that carried text
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def make_requests(args) -> list[RequestSpec]:
    """Returns the workload: fixed-range random lengths, or ShareGPT-like lognormal lengths."""
    rng = random.Random(args.seed)
    specs = []
    for _ in range(args.num_prompts):
        if args.dataset == "random":
            lo = lambda n: max(1, int(n * (1 - args.range_ratio)))
            n_in = rng.randint(lo(args.input_len), args.input_len)
            n_out = rng.randint(lo(args.output_len), args.output_len)
        else:  # ShareGPT-like: heavy-tailed conversation lengths (medians ~ input/output len)
            n_in = max(4, min(args.max_input_len, int(rng.lognormvariate(math.log(args.input_len), 0.8))))
            n_out = max(2, min(args.max_output_len, int(rng.lognormvariate(math.log(args.output_len), 0.7))))
        text = " ".join(rng.choice(_WORDS) for _ in range(n_in))
        specs.append(RequestSpec(text, n_in, n_out))
    return specs


async def one_request(client: httpx.AsyncClient, args, spec: RequestSpec) -> Result:
    """Sends one streaming request and returns its timings."""
    body = {"model": args.model, "max_tokens": spec.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    if args.endpoint == "chat":
        url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": spec.prompt}]
    else:
        url, body["prompt"] = "/v1/completions", spec.prompt
    if body["model"] is None:
        del body["model"]
    res = Result(ok=False)
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode()[:200]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                text = "".join((c.get("delta") or {}).get("content") or c.get("text") or "" for c in choices)
                if text:
                    res.chunks += 1
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = last is not None
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    v = sorted(values)
    pct = lambda q: v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))] * scale
    return {"mean": sum(v) / len(v) * scale, "p50": pct(50), "p99": pct(99)}


def summarize(args, results: list[Result], duration: float) -> dict:
    """Returns the JSON report (latencies in milliseconds)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def good(r: Result) -> bool:
        return ((args.slo_ttft_ms is None or r.ttft * 1000 <= args.slo_ttft_ms)
                and (args.slo_tpot_ms is None or r.tpot * 1000 <= args.slo_tpot_ms)
                and (args.slo_e2e_ms is None or r.e2e * 1000 <= args.slo_e2e_ms))

    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    return {
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "completed": len(ok), "failed": len(results) - len(ok), "failures_by_status": errors,
        "duration_s": duration,
        "request_throughput_rps": len(ok) / duration,
        "output_throughput_tok_s": out_tokens / duration,
        "total_token_throughput_tok_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "goodput_rps": sum(good(r) for r in ok) / duration,
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms, "e2e_ms": args.slo_e2e_ms},
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok if r.output_tokens > 1]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
        "mean_prompt_tokens": sum(r.prompt_tokens for r in ok) / max(1, len(ok)),
        "mean_output_tokens": out_tokens / max(1, len(ok)),
        "chunks_per_answer": _stats([r.chunks for r in ok], scale=1.0),
        "chunks_per_output_token": sum(r.chunks for r in ok) / max(1, out_tokens),
        "first_error": next((r.error for r in results if r.error), None),
    }


async def compare(args) -> dict:
    """Runs the workload against the guarded (``--base-url``) and unguarded server, one request at a time each,
    alternating; returns both reports."""
    specs = make_requests(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: dict[str, list[Result]] = {"guarded": [], "unguarded": []}
    spent = {"guarded": 0.0, "unguarded": 0.0}
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout) as g, \
            httpx.AsyncClient(base_url=args.unguarded_base_url, headers=headers, timeout=args.timeout) as u:
        for i, spec in enumerate(specs):
            order = [("guarded", g), ("unguarded", u)] if i % 2 == 0 else [("unguarded", u), ("guarded", g)]
            for name, client in order:
                t0 = time.perf_counter()
                results[name].append(await one_request(client, args, spec))
                spent[name] += time.perf_counter() - t0
    out = {name: summarize(args, rs, spent[name]) for name, rs in results.items()}
    ttft = [out[k]["ttft_ms"]["p50"] for k in ("guarded", "unguarded")]
    out["guard_ttft_ratio"] = ttft[0] / ttft[1] if None not in ttft and ttft[1] else None
    return out


async def run(args) -> dict:
    """Runs the whole benchmark and returns the report."""
    specs = make_requests(args)
    rng = random.Random(args.seed + 1)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout,
                                 limits=limits) as client:
        async def guarded(spec):
            if sem is None:
                return await one_request(client, args, spec)
            async with sem:
                return await one_request(client, args, spec)

        tasks = []
        start = time.perf_counter()
        for spec in specs:  # open loop: arrivals do not wait for earlier requests to finish
            tasks.append(asyncio.create_task(guarded(spec)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, results, duration)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="Model name to send (default: the server's).")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="completions")
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random",
                   help="random: uniform lengths in [len*(1-range_ratio), len]; sharegpt: lognormal lengths.")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Requests/s (Poisson); inf = burst.")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128, help="Prompt length in words (~tokens).")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=512)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="Generate exactly the output length (servelm/vLLM extension).")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-e2e-ms", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="Also write the JSON report here.")
    p.add_argument("--unguarded-base-url", default=None,
                   help="A --no-guard server of the same model: compare guarded and unguarded streaming.")
    args = p.parse_args(argv)
    report = asyncio.run(compare(args) if args.unguarded_base_url else run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if report.get("completed", 1) and report.get("guarded", {}).get("completed", 1) else 1


if __name__ == "__main__":
    sys.exit(main())
