"""Perplexity of the embedded SmolLM2 GGUF per weight format on real text, one run, JSON out.

Text: the English Wikipedia excerpt shipped in gensim's test data (markup stripped by gensim).
Model: the engine's own Llama loaded from the GGUF (dequantized at load), then
servelm.engine.quant.quantize_model per format, exactly as `--quantization` does at load.
Every format runs with bf16 activations; BF16 weights are the baseline.

    python3 bench/perplexity.py [--windows 16] [--ctx 512] [--lm-head]
"""
from __future__ import annotations

import argparse
import bz2
import copy
import glob
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from servelm.engine.quant import QuantConfig, model_weight_bytes, quantize_model  # noqa: E402


def wiki_text() -> str:
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    path = glob.glob(os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "enwiki-latest-pages-articles1*"))[0]
    pages = [filter_wiki(text).strip() for _, text, _ in extract_pages(bz2.open(path))]
    return "\n\n".join(p for p in pages if len(p) > 500 and not p.upper().startswith("#REDIRECT"))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    # One prefill of the whole window through the engine's attention backend (paged KV cache).
    from servelm.engine.attention import BatchLayout, get_backend

    cfg, dev, n, bs = model.config, ids.device, ids.numel(), 16
    nblocks = -(-n // bs)
    backend = get_backend("auto", dev)
    kv = backend.allocate_kv_cache(cfg.num_layers, nblocks, bs, cfg.num_kv_heads, cfg.head_dim,
                                   model.embed_tokens.weight.dtype, dev)
    layout = BatchLayout(slot_mapping=torch.arange(n), query_lens=[n], context_lens=[n],
                         block_tables=torch.arange(nblocks, dtype=torch.int32)[None], num_prefills=1,
                         num_prefill_tokens=n, context_lens_tensor=torch.tensor([n], dtype=torch.int32))
    hidden = model(ids, torch.arange(n), backend.make_context(layout, kv, cfg.head_dim ** -0.5))
    return model.compute_logits(hidden)


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, ctx: int, windows: int) -> float:
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * ctx:(w + 1) * ctx][None]
        logits = _logits(model, chunk[0])[None]
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        nll += loss.item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--formats", default="bf16,int8,int4,nf4,nf4-dq")
    ap.add_argument("--lm-head", action="store_true", help="quantize lm_head too")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from servelm.engine.models.loader import default_model_path, load_model
    from servelm.engine.tokenizer import Tokenizer

    gguf = default_model_path()
    loaded = load_model(None, torch.bfloat16, torch.device("cpu"))
    base = loaded.model.eval()
    tok = Tokenizer.from_source(loaded.tokenizer_source, loaded.config.eos_token_ids)
    ids = torch.tensor(tok.encode(wiki_text(), add_special_tokens=False))
    assert len(ids) >= args.ctx * args.windows, "text too short for the requested windows"
    results = {}
    for fmt in args.formats.split(","):
        model = copy.deepcopy(base)
        t = time.perf_counter()
        rep = None if fmt == "bf16" else quantize_model(model, QuantConfig.parse(fmt, include_lm_head=args.lm_head),
                                                        loaded.source_qtypes)
        qtime = time.perf_counter() - t
        t = time.perf_counter()
        ppl = perplexity(model, ids, args.ctx, args.windows)
        results[fmt] = {"perplexity": round(ppl, 4), "weight_bytes": model_weight_bytes(model),
                        "group_size": rep.group_size if rep else None,
                        "group_size_reason": rep.group_size_reason if rep else None,
                        "quantize_s": round(qtime, 1), "eval_s": round(time.perf_counter() - t, 1)}
        print(fmt, results[fmt], file=sys.stderr, flush=True)
        del model
    base_ppl = results.get("bf16", {}).get("perplexity")
    for r in results.values():
        r["change_vs_bf16_pct"] = round(100 * (r["perplexity"] / base_ppl - 1), 2) if base_ppl else None
    print(json.dumps({"bench": "perplexity", "model": gguf.name, "text": "gensim enwiki excerpt",
                      "tokens": args.ctx * args.windows, "ctx": args.ctx, "lm_head_quantized": args.lm_head,
                      "machine": f"{platform.machine()} {os.cpu_count()}-core CPU", "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d", time.gmtime()), "results": results}, indent=1))


if __name__ == "__main__":
    main()
