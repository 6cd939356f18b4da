"""Latency against request rate: start ``servelm serve``, run ``bench/serve.py`` at several rates, plot.

Each ``--configs`` entry is one server (extra ``servelm serve`` flags, e.g. ``--enforce-eager`` as the
baseline); each is started, warmed up, swept over ``--rates`` (Poisson arrivals; ``inf`` sends all at
once) and stopped. The workload is ShareGPT-like but synthetic: lognormal prompt and output lengths
whose means are about 200 and 180 tokens (medians ``--input-len``/``--output-len``, sigma 0.8/0.7),
``ignore_eos``. Prints one JSON object; ``--plot`` draws TTFT and TPOT (p50, p99) against the rate.

    python bench/serve_sweep.py --model dummy:llama-3-8b --rates 4 8 16 32 inf \
        --configs "" "--enforce-eager" --plot latency_vs_rate.png

A config may start with environment assignments for its server (``"SERVELM_WARMUP=0"``: no warm-up
before ready). ``--cold`` first runs ``--cold-rates`` (default: ``--rates``) on the freshly started server,
before anything else has reached it, then the usual warm-up run and sweep; the report gains ``cold`` (those
first runs) and ``tpot_p50_cold_over_warm`` per server and rate (a server that warms up before ready reads
about 1.0):

    python bench/serve_sweep.py --model dummy:llama-3-8b --rates 16 --cold --configs "" "SERVELM_WARMUP=0"
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import serve  # noqa: E402


def split_env(extra: str) -> tuple[dict[str, str], list[str]]:
    """Returns the leading ``NAME=value`` words of a config (its server's environment) and its flags."""
    words, env = shlex.split(extra), {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def start_server(model: str, port: int, extra: str, max_num_seqs: int, log_path: str) -> subprocess.Popen:
    env, flags = split_env(extra)
    cmd = [sys.executable, "-m", "servelm", "serve", "--model", model, "--port", str(port), "--no-auth", "--no-guard",
           "--no-rag", "--no-embeddings", "--max-num-seqs", str(max_num_seqs), "--max-queue", "4096",
           "--max-model-len", "2048", "--log-level", "warning", *flags]
    log = open(log_path, "w")  # noqa: SIM115 (kept open for the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    deadline = time.time() + 600
    while time.time() < deadline:  # polling a starting server is what a client does; loading takes a while
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.kill()
    raise RuntimeError("server did not become ready in 10 minutes")


def quiet(argv: list[str]) -> None:
    """Run bench/serve.py; its per-run JSON goes to stderr (stdout carries only the sweep's report)."""
    with contextlib.redirect_stdout(sys.stderr):
        serve.main(argv)


def sweep(args, extra: str, port: int, out_dir: str) -> tuple[dict, dict]:
    """Returns the sweep's results by rate, and (with ``--cold``) the fresh server's first runs by rate."""
    proc = start_server(args.model, port, extra, args.max_num_seqs, os.path.join(out_dir, f"server_{port}.log"))
    base = ["--base-url", f"http://127.0.0.1:{port}", "--dataset", "sharegpt", "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--max-input-len", "1024", "--max-output-len", "1024"]
    results, cold = {}, {}

    def run_rate(rate: float, tag: str) -> dict:
        n = args.num_prompts or int(min(400, max(64, (rate if rate != float("inf") else 16) * args.seconds)))
        path = os.path.join(out_dir, f"{tag}rate_{rate}_{port}.json")
        quiet(base + ["--num-prompts", str(n), "--request-rate", str(rate), "--seed", "1", "--out", path])
        with open(path) as f:
            r = json.load(f)
        return {k: r[k] for k in ("completed", "failed", "duration_s", "request_throughput_rps",
                                  "output_throughput_tok_s", "ttft_ms", "tpot_ms", "itl_ms",
                                  "e2e_ms", "mean_prompt_tokens", "mean_output_tokens", "first_error")}

    try:
        for rate in (args.cold_rates or args.rates) if args.cold else ():  # nothing has reached the server yet
            cold[str(rate)] = run_rate(rate, "cold_")
        warm = os.path.join(out_dir, "warm.json")
        quiet(base + ["--num-prompts", "16", "--request-rate", "inf", "--out", warm])
        for rate in args.rates:
            results[str(rate)] = run_rate(rate, "")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return results, cold


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, res in report["servers"].items():
        rates = list(res)
        xs = [float(r) if r != "inf" else 2 * max(float(x) for x in rates if x != "inf") for r in rates]
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
            for q, style in (("p50", "-o"), ("p99", "--s")):
                ax.plot(xs, [res[r][key][q] for r in rates], style, label=f"{label or 'default'} {q}")
    for ax, key in zip(axes, ("TTFT (ms)", "TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("request rate (req/s; rightmost point: all at once)")
        ax.set_ylabel(key)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"servelm serve {report['model']} on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def split_configs(ap: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Returns ``argv`` without ``--configs`` and its values, and those values.

    argparse reads a value that starts with "-" as an option, so it rejects ``--configs "" "--enforce-eager"``;
    here the values run from ``--configs`` to the next of this script's own options.
    """
    out, configs, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--configs":
            i += 1
            while i < len(argv) and argv[i] not in ap._option_string_actions:
                configs.append(argv[i])
                i += 1
            continue
        out.append(argv[i])
        i += 1
    return out, configs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 8, 16, 32, float("inf")])
    ap.add_argument("--configs", nargs="+", default=["", "--enforce-eager"],
                    help="extra servelm serve flags, one server each ('' = defaults)")
    ap.add_argument("--input-len", type=int, default=145, help="median prompt length (mean ~200 at sigma 0.8)")
    ap.add_argument("--output-len", type=int, default=141, help="median output length (mean ~180 at sigma 0.7)")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=15.0, help="arrival time per rate (prompts = rate x seconds)")
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--cold", action="store_true",
                    help="first run the rates on the freshly started server, then warm it up and sweep as usual")
    ap.add_argument("--cold-rates", type=float, nargs="+", default=None, help="rates of the cold runs (default: --rates)")
    argv, configs = split_configs(ap, sys.argv[1:])
    args = ap.parse_args(argv)
    args.configs = configs or args.configs
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="serve_sweep_")
    os.makedirs(out_dir, exist_ok=True)
    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        device = "unknown"
    report = {"model": args.model, "device": device, "workload": "synthetic ShareGPT-like lognormal lengths",
              "servers": {}}
    for i, extra in enumerate(args.configs):
        label = extra or "default"
        report["servers"][label], cold = sweep(args, extra, 8100 + i, out_dir)
        if args.cold:
            report.setdefault("cold", {})[label] = cold
            warm = report["servers"][label]
            report.setdefault("tpot_p50_cold_over_warm", {})[label] = {
                rate: (c["tpot_ms"]["p50"] / warm[rate]["tpot_ms"]["p50"]
                       if rate in warm and c["tpot_ms"]["p50"] and warm[rate]["tpot_ms"]["p50"] else None)
                for rate, c in cold.items()}
    if args.plot:
        try:
            plot(report, args.plot)
            report["plot"] = args.plot
        except ImportError:
            report["plot"] = "matplotlib not installed"
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
