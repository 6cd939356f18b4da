"""Offline throughput: servelm vs transformers ``generate`` with padded batches, plus KV waste and prefix-cache TTFT.

Workload (seeded random token ids, ``ignore_eos``, greedy):
  CUDA default: the nano-vllm benchmark, 256 requests, prompt and output lengths uniform in 100-1024,
                on the Qwen2-0.5B shape with random bf16 weights (nano-vllm uses Qwen3-0.6B).
  CPU default:  64 requests, prompts 32-256, outputs 32-256, the embedded SmolLM2 in float32.
Throughput is output tokens / wall time. Transformers runs the same requests, in left-padded batches of
``--hf-batch-size`` (each row generating its batch's longest output; only each request's own tokens count).
KV waste = (allocated - used) / allocated token slots, averaged over steps. TTFT with a 2,000-token
shared prefix: a request whose prefix is new (miss) vs one after it with the same prefix (hit).

    python bench/throughput.py [--model M] [--requests N] [--sweep] [--plot out.png]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.latency import hf_model, sync  # noqa: E402
from servelm.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def workload(n, lo_in, hi_in, lo_out, hi_out, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        pl = int(torch.randint(lo_in, hi_in + 1, (1,), generator=g))
        ol = int(torch.randint(lo_out, hi_out + 1, (1,), generator=g))
        reqs.append((torch.randint(100, vocab, (pl,), generator=g).tolist(), ol))
    return reqs


def run_engine(engine: LLMEngine, reqs) -> dict:
    """Run all requests to completion; returns tokens/s and the step-averaged KV waste."""
    for i, (p, ol) in enumerate(reqs):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=ol, temperature=0.0, ignore_eos=True))
    bs = engine.kv.block_size
    alloc = used = 0
    out_tokens = 0
    sync(engine.device)
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
        running = engine.scheduler.running
        alloc += sum(len(s.block_table) for s in running) * bs
        used += sum(s.num_computed_tokens for s in running)
    sync(engine.device)
    dt = time.perf_counter() - t
    return {"requests": len(reqs), "output_tokens": out_tokens, "seconds": dt, "tok_s": out_tokens / dt,
            "kv_waste": (alloc - used) / alloc if alloc else 0.0}


@torch.inference_mode()
def run_hf(m, reqs, device) -> dict:
    longest_in = max(len(p) for p, _ in reqs)
    longest_out = max(ol for _, ol in reqs)
    ids = torch.zeros(len(reqs), longest_in, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(reqs):
        ids[i, longest_in - len(p):] = torch.tensor(p)
        mask[i, longest_in - len(p):] = 1
    sync(device)
    t = time.perf_counter()
    m.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest_out,
               min_new_tokens=longest_out, do_sample=False, pad_token_id=0, eos_token_id=None)
    sync(device)
    dt = time.perf_counter() - t
    useful = sum(ol for _, ol in reqs)
    return {"requests": len(reqs), "output_tokens": useful, "seconds": dt, "tok_s": useful / dt}


def prefix_ttft(engine: LLMEngine, vocab: int, prefix_len: int = 2000, trials: int = 3,
                profile: bool = False) -> dict:
    """Median TTFT of a request with a new 2,000-token prefix (miss) and of one reusing it (hit)."""
    g = torch.Generator().manual_seed(1)

    def ttft(prompt):
        engine.add_request(f"p{time.perf_counter_ns()}", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return (time.perf_counter() - t) * 1e3

    miss, hit = [], []
    for _ in range(trials + 1):
        prefix = torch.randint(100, vocab, (prefix_len,), generator=g).tolist()
        m = ttft(prefix + torch.randint(100, vocab, (16,), generator=g).tolist())
        h = ttft(prefix + torch.randint(100, vocab, (16,), generator=g).tolist())
        miss.append(m)
        hit.append(h)
    miss, hit = miss[1:], hit[1:]  # the first pair warms up
    if profile:  # where a hit's and a miss's time goes (tables on stderr)
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch_profile(activities=acts) as prof:
            prefix = torch.randint(100, vocab, (prefix_len,), generator=g).tolist()
            ttft(prefix + [101] * 16)
            ttft(prefix + [102] * 16)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
    return {"prefix_tokens": prefix_len, "miss_ms": statistics.median(miss), "hit_ms": statistics.median(hit),
            "speedup": statistics.median(miss) / statistics.median(hit)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--hf-batch-size", type=int, default=None,
                    help="requests per transformers padded batch (default 64 on CUDA, 16 on CPU); it runs all of them")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--prompt-len", type=int, nargs=2, metavar=("LO", "HI"), help="prompt length range")
    ap.add_argument("--output-len", type=int, nargs=2, metavar=("LO", "HI"), help="output length range")
    ap.add_argument("--prefix-tokens", type=int, default=2000, help="shared prefix for the TTFT test")
    ap.add_argument("--profile-ttft", action="store_true", help="print a profile of the prefix-cache TTFT runs")
    ap.add_argument("--ttft-model", default=None, help="model for the prefix-cache TTFT (CUDA default: "
                    "dummy:llama-3-8b, where a 2,000-token prefill is real work; CPU: the throughput model)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model over")
    ap.add_argument("--sweep", action="store_true", help="also run max_num_seqs 8/32/128 (throughput vs batch)")
    ap.add_argument("--plot", default=None, help="PNG path for throughput vs batch size (needs --sweep, matplotlib)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    model = args.model or ("dummy:qwen2-0.5b" if cuda else None)
    n = args.requests or (256 if cuda else 64)
    lens = (100, 1024, 100, 1024) if cuda else (32, 256, 32, 256)
    if args.prompt_len:
        lens = (*args.prompt_len, *lens[2:])
    if args.output_len:
        lens = (*lens[:2], *args.output_len)
    cfg = EngineConfig(model=model, max_num_seqs=args.max_num_seqs, max_model_len=4096,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       kv_cache_memory_bytes=None if cuda else 2 << 30, tensor_parallel_size=args.tensor_parallel_size)
    engine = LLMEngine(cfg)
    vocab = min(engine.model_config.vocab_size, 32000)
    reqs = workload(n, *lens, vocab)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": engine.model_name,
           "dtype": str(engine.dtype).removeprefix("torch."), "torch": torch.__version__,
           "workload": {"requests": n, "prompt_len": lens[:2], "output_len": lens[2:], "ignore_eos": True},
           "kv_blocks": engine.kv.num_blocks, "block_size": engine.kv.block_size,
           "tensor_parallel_size": args.tensor_parallel_size}
    run_engine(engine, workload(min(n, 16), 32, 64, 8, 16, vocab, seed=9))  # warm-up
    res["servelm"] = run_engine(engine, reqs)
    ttft_model = args.ttft_model or ("dummy:llama-3-8b" if cuda else model)
    if ttft_model == model:
        res["prefix_cache_ttft"] = {"model": engine.model_name,
                                    **prefix_ttft(engine, vocab, args.prefix_tokens, profile=args.profile_ttft)}
    if args.sweep:
        sweep = {}
        for bs in [b for b in (8, 32, 128) if b < args.max_num_seqs]:
            engine.scheduler.config.max_num_seqs = bs  # the captured ladder already covers every smaller size
            sweep[bs] = run_engine(engine, workload(min(2 * bs, n), *lens, vocab, seed=100 + bs))["tok_s"]
        sweep[args.max_num_seqs] = res["servelm"]["tok_s"]
        engine.scheduler.config.max_num_seqs = args.max_num_seqs
        res["throughput_vs_batch"] = sweep
        if args.plot:
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt

                fig, ax = plt.subplots(figsize=(5, 3.5))
                ax.plot(list(sweep), list(sweep.values()), marker="o")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("max_num_seqs (batch size)")
                ax.set_ylabel("output tokens/s")
                ax.set_title(f"servelm {res['model']} on {res['device']}")
                fig.tight_layout()
                fig.savefig(args.plot, dpi=120)
                res["plot"] = args.plot
            except ImportError:
                res["plot"] = "matplotlib not installed"
    if not args.no_hf:
        import transformers

        dummy = bool(model) and model.startswith("dummy:")
        src, mc, device, dtype = engine.model, engine.model_config, engine.device, engine.dtype
        engine.shutdown()
        engine = None
        if cuda:
            torch.cuda.empty_cache()
        m = hf_model(src, mc, dtype, device, copy_weights=not dummy)
        del src
        k = args.hf_batch_size or (64 if cuda else 16)
        batches = [run_hf(m, reqs[i:i + k], device) for i in range(0, len(reqs), k)]
        tokens, seconds = sum(b["output_tokens"] for b in batches), sum(b["seconds"] for b in batches)
        r = {"requests": len(reqs), "batch_size": k, "output_tokens": tokens, "seconds": seconds,
             "tok_s": tokens / seconds}
        res["transformers"] = {"version": transformers.__version__, **r}
        res["speedup_vs_transformers"] = res["servelm"]["tok_s"] / r["tok_s"]
        del m
    if ttft_model != model:
        if engine is not None:
            engine.shutdown()
        engine = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        engine = LLMEngine(EngineConfig(model=ttft_model, max_num_seqs=8, max_model_len=4096,
                                        tensor_parallel_size=args.tensor_parallel_size))
        res["prefix_cache_ttft"] = {"model": engine.model_name,
                                    **prefix_ttft(engine, min(engine.model_config.vocab_size, 32000),
                                                  args.prefix_tokens, profile=args.profile_ttft)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
