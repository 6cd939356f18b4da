"""Peak memory of a quantized GGUF served as is: write a random-weight GGUF in a real shape, load it in a
fresh process, generate a few tokens, report file size, weight and KV bytes and the child's peak RSS (JSON).

    python bench/gguf_memory.py --shape llama-3.2-1b --qtype Q4_0 --kv-cache-memory 268435456
    python bench/gguf_memory.py --shape llama-3-8b --qtype Q4_0 --kv-cache-memory 268435456 --dir /tmp

The file is deleted afterwards unless --keep. The writer (``servelm.engine.models.gguf_random``) is importable.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from servelm.engine import LLM, SamplingParams
path, kv, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=path, skip_tokenizer_init=True, max_num_seqs=1, kv_cache_memory_bytes=kv, max_model_len=4096)
t1 = time.perf_counter()
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = llm.generate([list(range(1, 17))], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))[0]
t2 = time.perf_counter()
e = llm.engine
print(json.dumps({"load_s": round(t1 - t0, 2), "generate_s": round(t2 - t1, 2),
                  "generated_tokens": len(out.outputs[0].token_ids), "weights": e.weight_bytes,
                  "kv_bytes": e.kv_bytes, "peak_rss_after_load": rss_loaded,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "layer_types": sorted({type(m).__name__ for m in e.model.modules()} & {"GGUFBlockLinear", "Linear"})}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b", help="a dummy preset (servelm.engine.models.config.PRESETS)")
    ap.add_argument("--qtype", default="Q4_0")
    ap.add_argument("--kv-cache-memory", type=int, default=256 << 20)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from servelm.engine.models.config import preset
    from servelm.engine.models.gguf_random import write_random_gguf

    cfg = preset(args.shape)
    path = Path(args.dir) / f"servelm-bench-{args.shape}-{args.qtype}.gguf"
    t = time.perf_counter()
    write_random_gguf(path, cfg, args.qtype)
    write_s = time.perf_counter() - t
    size = path.stat().st_size
    try:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.kv_cache_memory), str(args.tokens)],
                           capture_output=True, text=True, env=env)
        if r.returncode:
            print(json.dumps({"error": r.stderr[-2000:]}))
            return
        child = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    gb = 1e9
    print(json.dumps({
        "shape": args.shape, "qtype": args.qtype, "file_bytes": size, "write_s": round(write_s, 1), **child,
        "file_gb": round(size / gb, 3), "peak_rss_gb": round(child["peak_rss"] / gb, 3),
        "kv_gb": round(child["kv_bytes"] / gb, 3),
        # the bound for an 8B file: 1.25 x file + KV budget + 0.6 GB
        "bound_gb": round((1.25 * size + child["kv_bytes"]) / gb + 0.6, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
