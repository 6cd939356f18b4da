"""Batch-1 decode of a mixture-of-experts model on CUDA (dummy weights in a real shape) against the copy
roofline over the bytes one token reads. JSON out; never asserts.

A token reads its attention weights, its routed experts' weights (top-k of them per layer), the router, the
norms, one embedding row and the LM head; the roofline is that many bytes at the card's measured
device-to-device copy bandwidth (read + write of a 1 GiB buffer). Decode rate = (N2 - N1) / (t(N2) - t(N1))
over greedy runs of N1 and N2 new tokens, so prefill and start-up cancel out.

    python3 bench/moe_decode.py [--model dummy:qwen3-30b-a3b] [--n1 16 --n2 144] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Bytes per second moved (read + written) by a device-to-device copy."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - t)


def bytes_per_token(cfg, elem: int) -> int:
    """Weight bytes one decoded token reads (the KV cache of a short context is left out: it is tiny here)."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = h * (q + 2 * kv) + q * h + 2 * h + (2 * cfg.head_dim if cfg.qk_norm else 0)
    total = 0
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):  # the routed experts, the router, a shared expert where there is one
            mlp = (cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size + cfg.num_experts * h
                   + 3 * h * cfg.shared_expert_intermediate_size)
        else:
            mlp = 3 * h * cfg.intermediate_size
        total += attn + mlp
    total += 2 * h + cfg.vocab_size * h  # final norm, one embedding row, the LM head
    return total * elem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:qwen3-30b-a3b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n1", type=int, default=16)
    ap.add_argument("--n2", type=int, default=144)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-bytes", type=int, default=2 << 30)
    args = ap.parse_args()
    from servelm.engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device="cuda", max_num_seqs=1, max_model_len=1024,
              kv_cache_memory_bytes=args.kv_bytes)
    cfg = llm.engine.model_config
    prompt = list(range(100, 132))

    def run(n: int) -> None:
        llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    run(4)  # warm-up: kernel compilation, CUDA graphs
    best = 0.0
    for _ in range(args.reps):
        torch.cuda.synchronize()
        t = time.perf_counter(); run(args.n1); t1 = time.perf_counter() - t
        t = time.perf_counter(); run(args.n2); t2 = time.perf_counter() - t
        best = max(best, (args.n2 - args.n1) / (t2 - t1))
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    per_token = bytes_per_token(cfg, elem)
    bw = copy_bandwidth()
    print(json.dumps({
        "bench": "moe_decode", "model": args.model, "dtype": args.dtype, "device": torch.cuda.get_device_name(),
        "decode_tok_s": round(best, 1), "bytes_per_token": per_token, "copy_bandwidth_gb_s": round(bw / 1e9, 1),
        "roofline_tok_s": round(bw / per_token, 1), "pct_of_copy_roofline": round(100 * best * per_token / bw, 1),
        "n1": args.n1, "n2": args.n2}, indent=1))


if __name__ == "__main__":
    main()
