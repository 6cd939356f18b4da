"""CPU single-stream decode tok/s per weight format with the servelm engine, against
llama.cpp (llama-cpp-python) on the same GGUF, same machine, same run. JSON out.

Decode rate = (N2 - N1) / (t(N2) - t(N1)) over two greedy runs of N1 and N2 new tokens, so
prompt processing and start-up cancel out. EOS is suppressed so every run decodes N tokens.

    python3 bench/quant_decode.py [--formats bf16,int8,int4,...] [--n1 16 --n2 144] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "The history of the Roman Empire began when"


def rate(run, n1: int, n2: int, reps: int) -> float:
    run(4)  # warm-up (kernel choice is measured on first sight)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter(); run(n1); t1 = time.perf_counter() - t
        t = time.perf_counter(); run(n2); t2 = time.perf_counter() - t
        best = max(best, (n2 - n1) / (t2 - t1))
    return best


def servelm_rate(fmt: str, args) -> dict:
    from servelm.engine import LLM, SamplingParams
    from servelm.engine.quant import kernels

    kernels.reset()
    dtype, _, quant = fmt.partition("/")
    llm = LLM(model=None, dtype=dtype, quantization=quant or None, max_num_seqs=1)
    rep = getattr(llm.engine, "quant_report", None)

    def run(n):
        llm.generate([PROMPT], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    r = {"tok_s": round(rate(run, args.n1, args.n2, args.reps), 1)}
    if rep is not None:
        r["weight_bytes_linear"] = rep.linear_bytes_after
        r["group_size"] = rep.group_size
    r["kernels"] = sorted({v for v in kernels.chosen().values()})
    del llm
    return r


def llamacpp_rate(args) -> dict:
    from llama_cpp import Llama

    from servelm.engine.models.loader import default_model_path

    llm = Llama(model_path=str(default_model_path()), n_ctx=512, n_threads=args.threads, n_batch=64,
                verbose=False, seed=0)
    eos = llm.token_eos()

    def run(n):
        llm.reset()
        llm.create_completion(PROMPT, max_tokens=n, temperature=0, logit_bias={eos: -1e9})

    return {"tok_s": round(rate(run, args.n1, args.n2, args.reps), 1),
            "llama_cpp_python": __import__("llama_cpp").__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="float32/,bfloat16/,bfloat16/int8,bfloat16/int4,bfloat16/int4+lm_head:int8,bfloat16/int4+lm_head,"
                                         "bfloat16/int8+lm_head,bfloat16/nf4,bfloat16/nf4-dq")
    ap.add_argument("--n1", type=int, default=16)
    ap.add_argument("--n2", type=int, default=144)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    results = {}
    if not args.no_llamacpp:
        try:
            results["llama.cpp (Q4_1 GGUF)"] = llamacpp_rate(args)
        except ImportError:
            results["llama.cpp (Q4_1 GGUF)"] = {"error": "llama-cpp-python not installed (see docs/quantization.md)"}
        print(results, file=sys.stderr, flush=True)
    for fmt in args.formats.split(","):
        results[fmt] = servelm_rate(fmt, args)
        print(fmt, results[fmt], file=sys.stderr, flush=True)
    ref = results.get("llama.cpp (Q4_1 GGUF)", {}).get("tok_s")
    for k, v in results.items():
        if ref and "tok_s" in v:
            v["vs_llama_cpp"] = round(v["tok_s"] / ref, 2)
    print(json.dumps({"bench": "quant_decode", "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "threads": args.threads,
                      "new_tokens": [args.n1, args.n2], "machine": f"{platform.machine()} {os.cpu_count()}-core CPU",
                      "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
