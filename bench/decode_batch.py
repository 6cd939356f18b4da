"""Decode tok/s of one request alone and of ``max_num_seqs`` requests together, on one engine. JSON line.

Shows what a weight format's kernel choice costs at each end of the batch range (e.g. int4 on CUDA,
whose layout is picked at load for the engine's ``max_num_seqs``). Greedy, ignore_eos, 16-token
prompts; CUDA default model: the Llama-3-8B shape with random weights.

    python bench/decode_batch.py [--quantization int4] [--max-num-seqs 16] [--model dummy:llama-3-8b]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from servelm.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def decode_rate(eng: LLMEngine, batch: int, new_tokens: int) -> float:
    """Output tokens per second of ``batch`` requests decoding together (their prefill step excluded)."""
    for i in range(batch):
        eng.add_request(f"r{time.monotonic_ns()}-{i}", list(range(100 + i, 116 + i)),
                        SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    eng.step()  # the prefill: each request's first token
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    t, tokens = time.perf_counter(), 0
    while eng.has_unfinished_requests():
        tokens += len(eng.step())  # one output per request per decode step
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: dummy:llama-3-8b on CUDA, the embedded SmolLM2 on CPU")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    eng = LLMEngine(EngineConfig(model=args.model or ("dummy:llama-3-8b" if cuda else None), dtype="auto",
                                 max_num_seqs=args.max_num_seqs, max_model_len=2048, quantization=args.quantization,
                                 gpu_memory_utilization=0.5))
    b = args.max_num_seqs
    decode_rate(eng, 1, 8), decode_rate(eng, b, 8)  # warm-up: kernel choices, Triton compilation
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": eng.model_name,
           "quantization": args.quantization, "kernel_env": os.environ.get("SERVELM_QUANT_KERNEL"),
           "max_num_seqs": b, "tok_s_batch_1": round(decode_rate(eng, 1, args.new_tokens), 1),
           f"tok_s_batch_{b}": round(decode_rate(eng, b, args.new_tokens), 1),
           "int4_layouts": sorted({f"{m.out_features}x{m.in_features}:{m.layout}" for m in eng.model.modules()
                                   if getattr(m, "method", None) == "int4"})}
    eng.shutdown()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
