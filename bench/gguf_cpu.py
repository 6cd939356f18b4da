"""GGUF on the CPU: servelm's native path against llama.cpp (llama-cpp-python) on the same files.

Prints JSON: per model, single-stream decode (128 new tokens after a 32-token prompt), prefill of 512
tokens, and servelm's aggregate decode over 16 concurrent streams, each next to llama.cpp's single stream,
run alternately in the same process (the machine may be shared: compare ratios, not absolute figures).

Models: the embedded SmolLM2-135M Q4_1 file, and Llama-3.2-1B-shaped random-weight files in Q4_0 and
Q4_K_M-like types (Q4_K, with Q6_K for output/attn_v/ffn_down as llama.cpp's Q4_K_M picks) written with
``servelm.engine.models.gguf_random``. llama.cpp needs a tokenizer in the file, so the random files carry
SmolLM2's tokenizer and its 49152-entry vocabulary (the 1B shape otherwise: 16 layers, hidden 2048, GQA 32/8).

    python3 bench/gguf_cpu.py [--threads 2] [--rounds 2] [--models smollm2,llama1b-q4_0,llama1b-q4_k_m]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from servelm.engine import LLM, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from servelm.engine import native  # noqa: E402
from servelm.engine.models.loader import default_model_path  # noqa: E402

PROMPT, NEW, PREFILL, STREAMS = 32, 128, 512, 16


def _write_random(path: Path, qtype: str, types: dict[str, str]) -> Path:
    """A Llama-3.2-1B-shaped random GGUF carrying SmolLM2's tokenizer (llama.cpp refuses files without one)."""
    import gguf

    from servelm.engine.models import gguf_random
    from servelm.engine.models.config import preset

    cfg = dataclasses.replace(preset("llama-3.2-1b"), vocab_size=49152, tie_word_embeddings=False,
                              max_position_embeddings=4096, name="llama-3.2-1b-shaped")
    src = gguf.GGUFReader(default_model_path())
    tok = [(k, f) for k, f in src.fields.items() if k.startswith("tokenizer.")]
    base = gguf.GGUFWriter

    class WithTokenizer(base):
        def write_header_to_file(self, *a, **k):
            for key, field in tok:
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                self.add_key_value(key, field.contents(), vtype, sub_type=sub)
            return super().write_header_to_file(*a, **k)

    gguf.GGUFWriter = WithTokenizer
    try:
        gguf_random.write_random_gguf(path, cfg, qtype, types=types)
    finally:
        gguf.GGUFWriter = base
    return path


def _files(names: list[str], tmp: Path) -> dict[str, Path]:
    out = {}
    for name in names:
        if name == "smollm2":
            out[name] = default_model_path()
        elif name == "llama1b-q4_0":
            out[name] = _write_random(tmp / "llama1b-q4_0.gguf", "Q4_0", {"output.weight": "Q6_K"})
        elif name == "llama1b-q4_k_m":
            types = {"output.weight": "Q6_K"}
            for i in range(16):
                if i % 2 == 0:  # Q4_K_M gives about half the layers' attn_v and ffn_down Q6_K
                    types[f"blk.{i}.attn_v.weight"] = "Q6_K"
                    types[f"blk.{i}.ffn_down.weight"] = "Q6_K"
            out[name] = _write_random(tmp / "llama1b-q4_k_m.gguf", "Q4_K", types)
    return out


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 40000, (n,), generator=g).tolist()


def _llamacpp_round(llm, prompt: list[int], long_prompt: list[int]) -> dict:
    llm.reset()
    t0 = time.perf_counter()
    n = 0
    for _ in llm.generate(prompt, temp=0.0, reset=True):
        n += 1
        if n == NEW:
            break
    decode = NEW / (time.perf_counter() - t0)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long_prompt)
    prefill = PREFILL / (time.perf_counter() - t0)
    return {"decode_tok_s": decode, "prefill_tok_s": prefill}


def _servelm_round(llm: LLM, prompt: list[int], long_prompt: list[int], streams: list[list[int]]) -> dict:
    p = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], p)
    decode = len(out[0].outputs[0].token_ids) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": long_prompt}], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    prefill = PREFILL / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": s} for s in streams], p)
    agg = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
    return {"decode_tok_s": decode, "prefill_tok_s": prefill, "streams16_aggregate_tok_s": agg}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="smollm2,llama1b-q4_0,llama1b-q4_k_m")
    args = ap.parse_args()
    from llama_cpp import Llama

    native.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "cpu_variant": native.cpu_variant(), "date": time.strftime("%Y-%m-%d"), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _files(args.models.split(","), Path(tmp)).items():
            lc = Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024,
                       n_batch=512, verbose=False)
            ours = LLM.from_engine(LLMEngine(EngineConfig(model=str(path), device="cpu", max_model_len=1024,
                                                          skip_tokenizer_init=True, enable_prefix_caching=False)))
            prompt, long_prompt = _prompt(PROMPT, 0), _prompt(PREFILL, 1)
            streams = [_prompt(PROMPT, 10 + i) for i in range(STREAMS)]
            _servelm_round(ours, prompt[:8], long_prompt[:64], streams[:2])  # warm-up
            _llamacpp_round(lc, prompt[:8], long_prompt[:64])
            rounds = []
            for _ in range(args.rounds):  # alternate, so both see the same machine load
                rounds.append({"llama_cpp": _llamacpp_round(lc, prompt, long_prompt),
                               "servelm": _servelm_round(ours, prompt, long_prompt, streams)})
            med = lambda side, key: statistics.median(r[side][key] for r in rounds)  # noqa: E731
            lc_dec, lc_pre = med("llama_cpp", "decode_tok_s"), med("llama_cpp", "prefill_tok_s")
            report["models"][name] = {
                "file": path.name, "file_mb": round(path.stat().st_size / 2**20, 1), "rounds": rounds,
                "decode_ratio": med("servelm", "decode_tok_s") / lc_dec,
                "prefill_ratio": med("servelm", "prefill_tok_s") / lc_pre,
                "streams16_vs_llama_cpp_single": med("servelm", "streams16_aggregate_tok_s") / lc_dec,
            }
            print(json.dumps({name: report["models"][name]}), flush=True)
            del lc, ours
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
