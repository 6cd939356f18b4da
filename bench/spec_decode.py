"""Speculative decoding against none, in one run: decode tok/s of each workload with speculation off and
on, alternating request by request over one loaded model. JSON line.

Workloads: ``rag`` (a ~1.5k-token context of policy paragraphs; each answer copies a paragraph, as
answers that quote their sources do) and ``chat`` (free questions: little to look up). Single stream
by default; ``--streams 16`` runs 16 requests at once (where speculation should turn itself off).
Greedy, so both sides emit the same tokens. The prefill step (the same on both sides) is left out.

    python bench/spec_decode.py                              # CPU: the embedded SmolLM2, ngram k=4
    python bench/spec_decode.py --model dummy:llama-3-8b --speculative-config \\
        '{"model": "dummy:llama-3.2-1b", "num_speculative_tokens": 4}'
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from servelm.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from servelm.engine.models.loader import load_model  # noqa: E402

_TOPICS = ["returns", "shipping", "warranty", "batteries", "repairs", "refunds", "accounts", "privacy",
           "deliveries", "exchanges", "gift cards", "subscriptions", "recalls", "installation", "cleaning",
           "storage", "travel", "spare parts", "software updates", "accessibility"]


def rag_prompts(n: int) -> list[list[dict]]:
    """Chat turns asking to copy one paragraph of a ~1.5k-token context, verbatim."""
    paras = [f"Section {i + 1} ({t}): Customers who ask about {t} are told that requests must be made within "
             f"{10 + 3 * i} days of purchase, that the original receipt is needed, and that the store answers "
             f"within {2 + i % 5} working days by e-mail. Staff note every {t} request in the ledger, with the "
             f"order number and the date, before the case is closed."
             for i, t in enumerate(_TOPICS)]
    context = "\n".join(paras)
    return [[{"role": "system", "content": "Answer from the context only. Quote it word for word."},
             {"role": "user", "content": f"Context:\n{context}\n\nCopy section {i % len(_TOPICS) + 1} of the context "
                                         "exactly, word for word."}] for i in range(n)]


_CHAT = ["Tell me a short story about a dragon who learns to cook.", "What are three good habits for sleep?",
         "Explain how a rainbow forms.", "Write a poem about the sea in autumn.",
         "Give me ideas for a birthday party for a ten-year-old.", "Why do cats purr?",
         "Describe your ideal weekend.", "How do bees make honey?"]


def chat_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": _CHAT[i % len(_CHAT)]}] for i in range(n)]


def decode(eng: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[int, float, list]:
    """(output tokens after each request's first, seconds they took, outputs' token ids) of ``prompts`` run
    together."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for i, ids in enumerate(prompts):
        eng.add_request(f"r{time.monotonic_ns()}-{i}", ids, params)
    while eng.scheduler.waiting or any(s.num_output_tokens == 0 for s in eng.scheduler.running):
        eng.step()  # the prefills: each request's first token
    first = sum(s.num_output_tokens for s in eng.scheduler.running)
    t, outs = time.perf_counter(), {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    toks = [outs[k] for k in sorted(outs)]
    return sum(len(x) for x in toks) - first, dt, toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 4, '
                    '"prompt_lookup_max": 4, "prompt_lookup_min": 2}')
    ap.add_argument("--workloads", default="rag,chat")
    ap.add_argument("--requests", type=int, default=4, help="requests per workload and side")
    ap.add_argument("--streams", type=int, default=1, help="requests run at once")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda" if cuda else "cpu")
    loaded = load_model(args.model, dtype, device, 4096, 0, gguf_blocks=True, max_rows=max(args.streams, 16))
    common = dict(model=args.model, dtype="auto", max_num_seqs=max(args.streams, 16), max_model_len=4096,
                  gpu_memory_utilization=0.45 if cuda else 0.9, kv_cache_memory_bytes=None if cuda else 512 << 20)
    off = LLMEngine(EngineConfig(**common), loaded=loaded)
    spec = json.loads(args.speculative_config)
    spec.setdefault("disable_by_batch_size", max(args.streams, 4))  # measure speculation itself, not its off switch
    on = LLMEngine(EngineConfig(**common, speculative_config=spec), loaded=loaded)
    tok = off.tokenizer
    res = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores)", "model": off.model_name, "speculative_config": spec, "streams": args.streams,
           "max_tokens": args.max_tokens, "torch_threads": torch.get_num_threads(),
           "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    for name in args.workloads.split(","):
        chats = (rag_prompts if name == "rag" else chat_prompts)(args.requests * args.streams)
        prompts = [tok.apply_chat_template(c, tokenize=True) for c in chats]
        decode(off, prompts[:1], 4), decode(on, prompts[:1], 4)  # warm-up
        a0 = on.stats()
        sums = {"off": [0, 0.0], "on": [0, 0.0]}
        same = True
        for r in range(args.requests):  # alternating, the order swapped each round
            batch = prompts[r * args.streams:(r + 1) * args.streams]
            order = (("off", off), ("on", on)) if r % 2 == 0 else (("on", on), ("off", off))
            got = {}
            for side, eng in order:
                n, dt, toks = decode(eng, batch, args.max_tokens)
                sums[side][0] += n
                sums[side][1] += dt
                got[side] = toks
            same &= got["off"] == got["on"]
        a1 = on.stats()
        drafted = a1.spec_num_draft_tokens - a0.spec_num_draft_tokens
        accepted = a1.spec_num_accepted_tokens - a0.spec_num_accepted_tokens
        drafts = a1.spec_num_drafts - a0.spec_num_drafts
        off_s, on_s = (sums[s][0] / sums[s][1] for s in ("off", "on"))
        res[name] = {"prompt_tokens": round(sum(map(len, prompts)) / len(prompts)),
                     "tok_s_off": round(off_s, 1), "tok_s_on": round(on_s, 1), "speedup": round(on_s / off_s, 2),
                     "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                     "mean_accepted_per_draft": round(accepted / drafts, 2) if drafts else None,
                     "same_tokens": same}
    res["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps(res))


if __name__ == "__main__":
    main()
