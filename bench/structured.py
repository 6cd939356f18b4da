"""Structured-output overhead: decode speed of a batch of constrained vs unconstrained requests (same run),
the grammar mask alone per step, and the grammar compile time of a typical JSON schema (TYPICAL: six fields,
a nested object and an array; a cold compile, then the cached one).

Workload: 8 chat prompts, greedy, ``max_tokens`` 48, the embedded SmolLM2 in float32 on the CPU (or --device).
Unconstrained requests ignore EOS; constrained ones follow SCHEMA (its long string fields keep them going).
tok/s = output tokens / wall time of the decode steps (the first step, the prefill, is left out). The
rounds alternate modes; reported: the best round of each, and the median over rounds of the slowdown
(unconstrained tok/s / constrained tok/s of the same round, which a shared box's drifting load spares
best). ``mask_ms_per_step`` times the grammar masks alone (fill + apply for the batch).

    python bench/structured.py [--device cpu|cuda] [--batch 8] [--max-tokens 48] [--rounds 3]
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

from servelm.engine import EngineConfig, LLMEngine, SamplingParams, StructuredOutputParams  # noqa: E402
from servelm.engine.structured_output import GrammarCompiler, apply_grammar_masks  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street", "city"]},
    "bio": {"type": "string", "minLength": 200}}, "required": ["name", "age", "email", "tags", "address", "bio"]}
# a typical extraction schema (what LangChain sends for a small pydantic model): compile time
TYPICAL = {**SCHEMA, "properties": {**SCHEMA["properties"], "bio": {"type": "string"}}}
QUESTIONS = ["Describe a person.", "Invent a customer record.", "Who lives next door?", "Describe a pilot.",
             "Make up a teacher.", "Describe a chef.", "Invent a poet.", "Describe a sailor."]


def decode_run(engine: LLMEngine, prompts: list[str], params: SamplingParams) -> dict:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    engine.step()  # the prefill
    tokens = steps = 0
    mask_s = 0.0
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        running = list(engine.scheduler.running)
        if any(s.grammar is not None for s in running):  # the mask alone, on a copy of a logits-shaped tensor
            logits = torch.zeros(len(running), engine.model_config.vocab_size, device=engine.device)
            m0 = time.perf_counter()
            apply_grammar_masks(logits, running)
            mask_s += time.perf_counter() - m0
        for o in engine.step():
            tokens += sum(len(c.delta_token_ids) for c in o.outputs)
        steps += 1
    dt = time.perf_counter() - t - mask_s  # the copy's mask is not part of the engine's step
    return {"tok_s": round(tokens / dt, 1), "ms_per_step": round(1000 * dt / steps, 2), "steps": steps,
            "tokens": tokens, "mask_ms_per_step": round(1000 * mask_s / steps, 3) if mask_s else 0.0}


def compile_times(engine: LLMEngine) -> dict:
    spec = StructuredOutputParams(json=TYPICAL)
    gc_ = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size)  # fresh: empty cache
    t = time.perf_counter()
    gc_._xgr_compiler()
    info_s = time.perf_counter() - t
    t = time.perf_counter()
    gc_.compile(spec)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    gc_.compile(spec)
    cached = time.perf_counter() - t
    return {"tokenizer_info_ms": round(1000 * info_s, 1), "schema_compile_ms": round(1000 * cold, 2),
            "schema_compile_cached_ms": round(1000 * cached, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    engine = LLMEngine(EngineConfig(device=args.device, dtype=dtype))
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(args.batch)]
    plain = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                 structured_output=StructuredOutputParams(json=SCHEMA))
    compiled = compile_times(engine)
    decode_run(engine, prompts, constrained)  # warm-up: imports, the engine's compile
    runs = {"unconstrained": [], "json_schema": []}
    for _ in range(args.rounds):
        runs["unconstrained"].append(decode_run(engine, prompts, plain))
        runs["json_schema"].append(decode_run(engine, prompts, constrained))
    best = {k: max(v, key=lambda r: r["tok_s"]) for k, v in runs.items()}
    ratios = sorted(u["tok_s"] / c["tok_s"] for u, c in zip(runs["unconstrained"], runs["json_schema"]))
    print(json.dumps({"device": str(engine.device), "batch": args.batch, "max_tokens": args.max_tokens,
                      "rounds": args.rounds, **best, "slowdown_per_round": [round(r, 3) for r in ratios],
                      "slowdown_median": round(ratios[len(ratios) // 2], 3), "compile": compiled}, indent=1))


if __name__ == "__main__":
    main()
