"""Decode-sized matrix products of the Llama-3-8B shapes: Triton weight-only kernels against torch's.

For each weight format, layer shape and row count M, times y = x W^T per kernel and reports the
achieved weight bandwidth (bytes of the weight, codes plus scales, over the time) as a fraction of a
device-to-device copy measured in the same run (bytes read + written), i.e. of the HBM roofline that
``bench/latency.py`` uses.

- w16: cuBLAS (F.linear) vs triton_gemv.w16_matmul
- int4 (group 128): torch's tinygemm aten._weight_int4pack_mm vs triton_gemv.w4_matmul vs the
  tensor-core kernel cuda_w4.matmul
- int8 (per-row scale): dequantize+matmul and torch._weight_int8pack_mm vs triton_gemv.w8_matmul

Each timing is a CUDA graph that runs the product once over each of several copies of the weight
(at least 512 MB in all, so nothing is served from L2, as in a real decode step where every layer's
weight differs), replayed 20 times; the median replay over the copies is the time per product.
``--sweep`` also times a grid of block sizes for M=1 and M=16 (compiled in parallel processes first)
and reports the best, which is how ``triton_gemv.pick_config``'s table was chosen; ``--sweep-cuda``
does the same for the work split of the tensor-core kernel (``cuda_w4.pick_config``).

    python bench/gemv.py [--formats w16,int4,int8] [--rows 1,2,4,8,16] [--sweep] [--sweep-cuda] [--out FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.latency import copy_bandwidth, replay_ms  # noqa: E402
from servelm.engine.quant import cuda_w4  # noqa: E402
from servelm.engine.quant import triton_gemv as tg  # noqa: E402
from servelm.engine.quant.int4 import quantize_int4  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
GROUP = 128
DEV = torch.device("cuda")


def make_weights(fmt: str, n: int, k: int) -> dict:
    """One copy of a layer's weight in every layout the candidates of `fmt` read."""
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02
    if fmt == "w16":
        return {"w": w, "bytes": w.numel() * 2}
    if fmt == "int4":
        q, s, z = quantize_int4(w, GROUP)
        sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        return {"gemv": tg.pack_int4(q, GROUP), "tinygemm": torch.ops.aten._convert_weight_to_int4pack(u8, 8),
                "mma": cuda_w4.pack(q), "sz": sz, "bytes": n * k // 2 + sz.numel() * 2}
    q = torch.randint(-127, 128, (n, k), device=DEV, dtype=torch.int8)
    s = torch.rand(n, device=DEV) * 1e-3
    return {"q": q, "s": s, "s16": s.to(torch.bfloat16), "bytes": n * k + n * 4}


def candidates(fmt: str, cfg: tg.Config | None = None, mma_cfg: tuple | None = None) -> dict:
    """name -> fn(x, weights) for `fmt`; `cfg` fixes the Triton kernel's blocks, `mma_cfg` the
    tensor-core kernel's (S, R, U)."""
    if fmt == "w16":
        return {"cublas": lambda x, c: F.linear(x, c["w"]), "triton": lambda x, c: tg.w16_matmul(x, c["w"], cfg)}
    if fmt == "int4":
        return {"tinygemm": lambda x, c: torch.ops.aten._weight_int4pack_mm(x, c["tinygemm"], GROUP, c["sz"]),
                "triton": lambda x, c: tg.w4_matmul(x, c["gemv"], c["sz"], GROUP, cfg),
                "cuda_w4": lambda x, c: cuda_w4.matmul(x, c["mma"], c["sz"], GROUP, mma_cfg)}
    return {"dequant_matmul": lambda x, c: F.linear(x, c["q"].to(x.dtype)) * c["s16"],
            "int8pack": lambda x, c: torch._weight_int8pack_mm(x, c["q"], c["s16"]),
            "triton": lambda x, c: tg.w8_matmul(x, c["q"], c["s"], cfg)}


def time_graph(fn, x, copies: list[dict]) -> float:
    """Median seconds per product: a CUDA graph of one product per weight copy, replayed."""
    for c in copies[:2]:
        fn(x, c)  # compile / warm up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in copies:
            fn(x, c)
    times = replay_ms(g, 23)[3:]
    del g
    return statistics.median(times) / 1e3 / len(copies)


def reference(fmt: str, x: torch.Tensor, c: dict) -> torch.Tensor:
    if fmt == "w16":
        return x.float() @ c["w"].float().t()
    if fmt == "int4":  # the kernels read bf16 scales: dequantize with those
        q = tg.unpack_int4(c["gemv"], GROUP).float()
        n, k = q.shape
        s, z = c["sz"].float().transpose(0, 1).unbind(-1)
        return x.float() @ ((q.reshape(n, k // GROUP, GROUP) - 8) * s[..., None] + z[..., None]).reshape(n, k).t()
    return (x.float() @ c["q"].float().t()) * c["s"]


def sweep_grid(fmt: str, m: int) -> list[tg.Config]:
    """Block-size grid searched for one format at M=1 (gemv; for int4 also the 16-row dot tile) or M=16."""
    P = itertools.product
    splits = (1, 2, 4, 8)
    if fmt == "int4":  # wide column blocks (the words are transposed: [K/8, N])
        dot = [tg.Config(16, bn, 128, sp, nw, ns) for bn, sp, nw, ns in P((64, 128, 256), splits, (4, 8), (2, 3))]
        if m > 1:
            return dot
        return [tg.Config(1, bn, bk, sp, nw, ns) for bn, bk, sp, nw, ns in
                P((128, 256, 512), (128, 256), splits + (16, 32), (4, 8), (1, 3))] + \
            [c for c in dot if c.num_warps == 4]
    if m == 1:
        bns, bks = ((16, 32), (512, 1024)) if fmt == "w16" else ((16, 32, 64), (512, 1024))
        return [tg.Config(1, bn, bk, sp, nw, ns) for bn, bk, sp, nw, ns in P(bns, bks, splits, (4, 8), (1, 3))]
    return [tg.Config(16, bn, bk, sp, 4, ns) for bn, bk, sp, ns in P((32, 64), (128, 256), (1, 4), (2, 4))]


def _compile(job: tuple[str, list[tg.Config]]) -> int:
    """Compile (by running once on small inputs) every config of `job` into Triton's on-disk cache."""
    fmt, cfgs = job
    c = make_weights(fmt, 256, 1024)
    done = 0
    for cfg in cfgs:
        x = torch.randn(cfg.block_m if cfg.block_m > 1 else 1, 1024, device=DEV, dtype=torch.bfloat16)
        candidates(fmt, cfg)["triton"](x, c)
        done += 1
    torch.cuda.synchronize()
    return done


def precompile(jobs: list[tuple[str, tg.Config]], workers: int) -> None:
    chunks = [(fmt, [cfg for f, cfg in jobs[i::workers] if f == fmt]) for i in range(workers)
              for fmt in {f for f, _ in jobs}]
    with ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn")) as ex:
        list(ex.map(_compile, [c for c in chunks if c[1]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="w16,int4,int8")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also search block sizes at M=1 and M=16")
    ap.add_argument("--sweep-cuda", action="store_true", help="also search the tensor-core kernel's work split")
    ap.add_argument("--min-bytes", type=int, default=512 << 20, help="weight bytes per timing (L2 defeat)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    formats, rows, shapes = args.formats.split(","), [int(r) for r in args.rows.split(",")], args.shapes.split(",")
    if args.sweep:
        jobs = [(f, cfg) for f in formats for m in (1, 16) for cfg in sweep_grid(f, m)]
        precompile(jobs, min(16, os.cpu_count() or 4))
    torch.manual_seed(0)
    bw = copy_bandwidth(DEV)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_TBps": bw / 1e12,
           "group_size": GROUP, "results": [], "sweep": []}
    table = []
    for fmt in formats:
        for name in shapes:
            n, k = SHAPES[name]
            one = make_weights(fmt, n, k)
            copies = [one] + [make_weights(fmt, n, k) for _ in range(max(0, -(-args.min_bytes // one["bytes"]) - 1))]
            for m in rows:
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                ref = reference(fmt, x, one)
                row = {"format": fmt, "shape": name, "n": n, "k": k, "m": m, "weight_bytes": one["bytes"],
                       "config": tg.pick_config(fmt, m, n, k, GROUP, tg._num_sms(DEV))._asdict(), "kernels": {}}
                for cand, fn in candidates(fmt).items():
                    try:
                        err = ((fn(x, one).float() - ref).norm() / ref.norm()).item()
                        t = time_graph(fn, x, copies)
                    except (RuntimeError, NotImplementedError) as e:
                        row["kernels"][cand] = {"error": str(e)[:200]}
                        continue
                    row["kernels"][cand] = {"us": t * 1e6, "GBps": one["bytes"] / t / 1e9,
                                            "roofline_fraction": one["bytes"] / t / bw, "rel_err": err}
                res["results"].append(row)
                kk = row["kernels"]
                table.append(f"{fmt:5s} {name:8s} M={m:<2d} " + "  ".join(
                    f"{c}={v['us']:.1f}us({v['roofline_fraction'] * 100:.0f}%)" if "us" in v else f"{c}=ERR"
                    for c, v in kk.items()))
                if args.sweep_cuda and fmt == "int4":
                    timed = sorted((time_graph(candidates(fmt, mma_cfg=mc)["cuda_w4"], x, copies), mc)
                                   for mc in cuda_w4.SWEEP)
                    best = timed[0]
                    res["sweep"].append({"format": fmt, "kernel": "cuda_w4", "shape": name, "m": m, "best": best[1],
                                         "us": best[0] * 1e6, "roofline_fraction": one["bytes"] / best[0] / bw,
                                         "all_us": [[list(mc), round(t * 1e6, 2)] for t, mc in timed]})
                    table.append(f"      cuda_w4 best (S,R,U)={best[1]} {best[0] * 1e6:.1f}us "
                                 f"({one['bytes'] / best[0] / bw * 100:.0f}%)")
                if args.sweep and m in (1, 16):
                    best = None
                    for cfg in sweep_grid(fmt, m):
                        fn = candidates(fmt, cfg)["triton"]
                        t = time_graph(fn, x, copies)
                        if best is None or t < best[0]:
                            best = (t, cfg)
                    err = ((candidates(fmt, best[1])["triton"](x, one).float() - ref).norm() / ref.norm()).item()
                    res["sweep"].append({"format": fmt, "shape": name, "m": m, "best": best[1]._asdict(),
                                         "us": best[0] * 1e6, "roofline_fraction": one["bytes"] / best[0] / bw,
                                         "rel_err": err})
                    table.append(f"      best {best[1]} {best[0] * 1e6:.1f}us "
                                 f"({one['bytes'] / best[0] / bw * 100:.0f}%)")
            del copies, one
            torch.cuda.empty_cache()
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text if not args.out else "")
    print(f"{res['device']}  copy {bw / 1e12:.2f} TB/s")
    print("\n".join(table))


if __name__ == "__main__":
    main()
