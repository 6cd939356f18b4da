"""Start-up time of ``servelm serve``: seconds from launching the process to a 200 from ``/health``.

Compares code trees (e.g. a baseline checkout and this one) in the same run, alternating them so a
loaded machine slows both alike, for each server configuration; prints JSON (median, min, every run).

    git archive <base> | tar -x -C /tmp/servelm-base
    python bench/startup.py --tree base=/tmp/servelm-base --tree new=. --repeats 3

It also times ``import servelm.server.app`` in a fresh interpreter per tree (what ``serve`` imports
before it loads anything). Configurations: ``no-guard`` (``--no-guard``), ``pii-off`` (the shipped policy with the pii scanner
disabled) and ``default`` (the shipped policy, PII on). Every run adds ``--no-embeddings --no-rag`` so
the embedding model's load does not drown the difference (``--flags`` replaces them).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time


CONFIGS = {"no-guard": ["--no-guard"], "pii-off": ["--policy", "{dir}/pii-off.yaml"], "default": []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    """True when /health answers 200 (stdlib http.client: polling must cost the measured server little CPU)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def import_time(tree: str) -> float:
    """Returns the seconds a fresh interpreter takes to import the server app (what `serve` imports first)."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    code = "import time; t = time.perf_counter(); import servelm.server.app; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.abspath(tree), capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def start_time(tree: str, flags: list[str], timeout: float) -> float:
    """Returns the seconds from launching ``servelm serve`` (code from ``tree``) to a 200 from /health."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.abspath(tree)}
    with tempfile.TemporaryDirectory(prefix="servelm-startup-") as d:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "servelm.server", "serve", "--port", str(port), "--data-dir", d,
                                 "--no-auth", *flags], env=env, cwd=os.path.abspath(tree),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server from {tree} exited with {proc.returncode}")
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"server from {tree} not healthy after {timeout} s")
                if healthy(port):
                    return time.perf_counter() - t0
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=DIR",
                   help="a code tree to start servelm from (repeat; the first is the baseline)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flags", default="--no-embeddings --no-rag", help="flags added to every start")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "pii-off.yaml"), "w") as f:
            f.write("scanners: {pii: {enabled: false}}\n")
        runs: dict[str, dict[str, list[float]]] = {c: {t: [] for t in trees} for c in args.configs.split(",")}
        imports: dict[str, list[float]] = {t: [] for t in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                imports[name].append(round(import_time(tree), 2))
            for config, by_tree in runs.items():
                flags = [x.format(dir=d) for x in CONFIGS[config]] + args.flags.split()
                for name, tree in trees.items():
                    by_tree[name].append(round(start_time(tree, flags, args.timeout), 2))
    base = next(iter(trees))
    out = {"metric": "seconds from launching servelm serve to 200 on /health", "flags": args.flags,
           "repeats": args.repeats, "load_avg_after": os.getloadavg()[0],
           "import_servelm_server_app": {t: {"median_s": statistics.median(v), "runs": v} for t, v in imports.items()},
           "configs": {}}
    for config, by_tree in runs.items():
        med = {t: statistics.median(v) for t, v in by_tree.items()}
        out["configs"][config] = {t: {"median_s": round(med[t], 2), "min_s": min(v), "runs": v,
                                      f"vs_{base}": round(med[t] / med[base], 3)} for t, v in by_tree.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
