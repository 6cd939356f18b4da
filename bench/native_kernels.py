"""Native GGUF block kernels alone: milliseconds per matrix product for Llama-3.2-1B shapes.

Prints JSON: for each weight type and each shape (the 1B model's fused q|k|v, o, gate|up, down and lm_head
products), the median time of ``native.matmul`` at M = 1, 16 and 512 activation rows, and the implied
weight-read rate at M = 1. Independent of llama.cpp, so kernel changes can be compared on a shared box.

    python3 bench/native_kernels.py [--threads 2] [--types Q4_0,Q4_1,Q8_0,Q4_K,Q6_K] [--m 1,16,512] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import gguf
import numpy as np
import torch

from servelm.engine import native

# (name, n outputs, k inputs) of Llama-3.2-1B (hidden 2048, 32/8 heads of 64, intermediate 8192)
SHAPES = [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192),
          ("lm_head", 49152, 2048)]
SCALE_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
                "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(qtype: gguf.GGMLQuantizationType, n: int, k: int) -> torch.Tensor:
    """Random GGUF bytes of ``qtype`` [n, row_bytes] with sane fp16 scales."""
    rng = np.random.default_rng(0)
    if qtype.name in ("F32", "F16", "BF16"):
        w = rng.standard_normal((n, k)).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w, qtype).view(np.uint8).reshape(n, -1)))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype.name]:
        raw[:, off:off + 2] = rng.uniform(0.001, 0.05, size=raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1).copy())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="Q4_0,Q4_1,Q8_0,Q4_K,Q6_K")
    ap.add_argument("--m", default="1,16,512")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    native.set_num_threads(args.threads)
    ms = [int(v) for v in args.m.split(",")]
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    report = {"machine": platform.processor() or platform.machine(), "cpu_variant": native.cpu_variant(),
              "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M"), "ms": {}}
    for tname in args.types.split(","):
        qtype = gguf.GGMLQuantizationType[tname]
        per = {}
        for name, n, k in shapes:
            w = random_blocks(qtype, n, k)
            row = {}
            for m in ms:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
                out = torch.empty(m, n)
                native.matmul(x, w, qtype, n, k, out=out)  # warm: weights in cache/TLB as far as they fit
                reps = max(1, args.reps if m < 512 else args.reps // 2)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    native.matmul(x, w, qtype, n, k, out=out)
                    times.append(time.perf_counter() - t0)
                row[f"M{m}"] = round(1e3 * statistics.median(times), 3)
            if "M1" in row:
                row["M1_GB_s"] = round(w.numel() / (row["M1"] / 1e3) / 1e9, 2)
            per[name] = row
        report["ms"][tname] = per
        print(json.dumps({tname: per}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
