"""Perplexity of the embedded SmolLM2 GGUF per weight format on real text, one run, JSON out.

Text: the English Wikipedia excerpt shipped in gensim's test data (markup stripped by gensim).
Model: the engine's own Llama loaded from the GGUF (dequantized at load), then
servelm.engine.quant.quantize_model per format, exactly as `--quantization` does at load.
Every format runs with bf16 activations; BF16 weights are the baseline.

Windows of `--ctx` tokens are spread evenly over the whole excerpt (about 730k tokens), not taken
from its first articles only; `--windows 0` uses every window. Besides each format's perplexity
change the JSON gives its standard error across windows (paired: the same windows for every
format), so a change can be told from noise.

    python3 bench/perplexity.py [--windows 32] [--ctx 512] [--lm-head] [--formats bf16,int8,...]
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
from servelm.engine.quant import QuantConfig, calibration_windows, model_weight_bytes, quantize_model  # noqa: E402
from servelm.engine.quant.calibrate import prefill_hidden  # noqa: E402


def wiki_text() -> str:
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    path = glob.glob(os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "enwiki-latest-pages-articles1*"))[0]
    pages = [filter_wiki(text).strip() for _, text, _ in extract_pages(bz2.open(path))]
    return "\n\n".join(p for p in pages if len(p) > 500 and not p.upper().startswith("#REDIRECT"))


def calibration_path() -> str:
    """Returns the path of gensim's Lee news corpus (Australian news, 2001): English prose that
    shares no text with the Wikipedia evaluation excerpt."""
    import gensim
    return os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    # One prefill of the whole window through the engine's attention backend (paged KV cache).
    return model.compute_logits(prefill_hidden(model, ids))


def window_starts(n_tokens: int, ctx: int, windows: int) -> list[int]:
    """Returns the first token of each window: `windows` evenly spread, or all of them for 0."""
    total = n_tokens // ctx
    if windows <= 0 or windows >= total:
        return [i * ctx for i in range(total)]
    return [(i * total // windows) * ctx for i in range(windows)]


@torch.inference_mode()
def window_nlls(model, ids: torch.Tensor, starts: list[int], ctx: int) -> torch.Tensor:
    """Returns the mean next-token NLL (nats) of each window."""
    out = []
    for s in starts:
        chunk = ids[s:s + ctx]
        logits = _logits(model, chunk)
        out.append(torch.nn.functional.cross_entropy(logits[:-1].float(), chunk[1:]).item())
    return torch.tensor(out, dtype=torch.float64)


def change_pct(nll: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """Returns (perplexity change % vs base, its standard error %) from paired per-window NLLs."""
    d = nll - base
    se = d.std().item() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    mean = d.mean().item()
    return 100 * math.expm1(mean), 100 * math.exp(mean) * se


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32, help="windows spread over the text; 0 = all")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--formats", default="bf16,int8,int4,nf4,nf4-dq")
    ap.add_argument("--lm-head", action="store_true", help="quantize lm_head too")
    ap.add_argument("--calib-windows", type=int, default=4,
                    help="windows of calibration text (Lee news corpus) for nf4's scale search; 0 = none")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from servelm.engine.models.loader import default_model_path, load_model
    from servelm.engine.tokenizer import Tokenizer

    gguf = default_model_path()
    loaded = load_model(None, torch.bfloat16, torch.device("cpu"))
    base = loaded.model.eval()
    tok = Tokenizer.from_source(loaded.tokenizer_source, loaded.config.eos_token_ids)
    ids = torch.tensor(tok.encode(wiki_text(), add_special_tokens=False))
    starts = window_starts(len(ids), args.ctx, args.windows)
    calib = calibration_windows(tok, calibration_path(), args.ctx, args.calib_windows) if args.calib_windows else []
    results, nlls = {}, {}
    for fmt in args.formats.split(","):
        model = copy.deepcopy(base)
        t = time.perf_counter()
        rep = None if fmt == "bf16" else quantize_model(model, QuantConfig.parse(fmt, include_lm_head=args.lm_head),
                                                        loaded.source_qtypes, calib)
        qtime = time.perf_counter() - t
        t = time.perf_counter()
        nlls[fmt] = window_nlls(model, ids, starts, args.ctx)
        results[fmt] = {"perplexity": round(math.exp(nlls[fmt].mean().item()), 4), "weight_bytes": model_weight_bytes(model),
                        "group_size": rep.group_size if rep else None,
                        "group_size_reason": rep.group_size_reason if rep else None,
                        "quantize_s": round(qtime, 1), "eval_s": round(time.perf_counter() - t, 1)}
        if "bf16" in nlls:
            change, se = change_pct(nlls[fmt], nlls["bf16"])
            results[fmt].update(change_vs_bf16_pct=round(change, 2), change_se_pct=round(se, 2))
        print(fmt, results[fmt], file=sys.stderr, flush=True)
        del model
    print(json.dumps({"bench": "perplexity", "model": gguf.name, "text": "gensim enwiki excerpt",
                      "text_tokens": len(ids), "windows": len(starts), "tokens": args.ctx * len(starts),
                      "ctx": args.ctx, "calibration_tokens": sum(c.numel() for c in calib),
                      "calibration_text": "gensim lee_background.cor", "lm_head_quantized": args.lm_head,
                      "machine": f"{platform.machine()} {os.cpu_count()}-core CPU", "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d", time.gmtime()), "results": results}, indent=1))


if __name__ == "__main__":
    main()
