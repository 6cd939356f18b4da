"""Weight memory per format for a named model shape with dummy weights, JSON out.

Builds the model through the engine's loader ("dummy:<shape>", random weights) on the chosen
device, quantizes it, and reports the bytes its tensors hold (measured) next to the ladder's
computed figure, plus torch.cuda.memory_allocated on CUDA. FP16/BF16 are the baseline.

    python3 bench/quant_memory.py --shape llama-2-7b --device cuda [--include-lm-head]
    python3 bench/quant_memory.py --shape smollm2-135m            # CPU, small shapes
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from servelm.engine.models.loader import load_model  # noqa: E402
from servelm.engine.quant import QuantConfig, model_weight_bytes, quantize_model  # noqa: E402
from servelm.engine.quant.report import ladder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m", help="a dummy preset, e.g. llama-2-7b, llama-3-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--formats", default="fp16,bf16,int8,int4,nf4,nf4-dq")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--include-lm-head", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    computed = ladder(f"dummy:{args.shape}", args.group_size, args.include_lm_head)["formats"]
    results = {}
    for fmt in args.formats.split(","):
        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(fmt, torch.bfloat16)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(dev)
        loaded = load_model(f"dummy:{args.shape}", dtype, dev)
        t = time.perf_counter()
        rep = None
        if fmt in ("int8", "int4", "nf4", "nf4-dq"):
            rep = quantize_model(loaded.model, QuantConfig(fmt, args.group_size, args.include_lm_head))
        r = {"measured_bytes": model_weight_bytes(loaded.model), "computed_bytes": computed[fmt]["computed_bytes"],
             "group_size": rep.group_size if rep else None, "quantize_s": round(time.perf_counter() - t, 1)}
        if dev.type == "cuda":
            gc.collect(); torch.cuda.empty_cache()
            r["cuda_allocated_bytes"] = torch.cuda.memory_allocated(dev) - base
        r["measured_GB"] = round(r["measured_bytes"] / 1e9, 3)
        results[fmt] = r
        print(fmt, r, file=sys.stderr, flush=True)
        del loaded, rep
        gc.collect()
    print(json.dumps({"bench": "quant_memory", "shape": args.shape, "device": str(dev),
                      "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
                      "lm_head_quantized": args.include_lm_head, "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d", time.gmtime()), "results": results}, indent=1))


if __name__ == "__main__":
    main()
