"""Single-stream decode latency: servelm vs transformers ``generate`` (and, on CUDA, the HBM roofline).

One request, batch 1, a short prompt, 128 new tokens (greedy, ignore_eos). Decode speed is
(new tokens - 1) / (time after the first token). Prints one JSON object.

CPU default: the embedded SmolLM2 in float32; transformers runs the same weights.
CUDA default: the Llama-3-8B shape with random bf16 weights; transformers runs a randomly
initialised model of the same shape; the roofline is the measured device-to-device copy
bandwidth (bytes read + written) over the bytes of the weights (every parameter once per token),
measured first, on an idle GPU (measured after the transformers run it read higher than the device's
peak, and servelm above 100 % of it).

    python bench/latency.py [--model dummy:llama-3-8b] [--new-tokens 128] [--no-hf]
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

from servelm.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def hf_model(model, cfg, dtype, device, copy_weights: bool):
    """A transformers Llama/Qwen2 of the same shape; with ``copy_weights`` it gets our (unfused) weights."""
    import transformers

    cls_cfg = transformers.Qwen2Config if cfg.arch == "qwen2" else transformers.LlamaConfig
    hf_cfg = cls_cfg(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                     rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                     max_position_embeddings=cfg.max_position_embeddings,
                     tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
                     pad_token_id=0)
    arch = transformers.Qwen2ForCausalLM if cfg.arch == "qwen2" else transformers.LlamaForCausalLM
    with torch.device(device):
        m = arch(hf_cfg).to(dtype)
    if copy_weights:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        sd = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight,
              "lm_head.weight": model.lm_head.weight}
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            wq, wk, wv = layer.self_attn.qkv_proj.weight.split([q, kv, kv])
            g, u = layer.mlp.gate_up_proj.weight.chunk(2)
            sd.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                       p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
                       p + "mlp.gate_proj.weight": g, p + "mlp.up_proj.weight": u,
                       p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
                       p + "input_layernorm.weight": layer.input_layernorm.weight,
                       p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight})
            if cfg.attention_bias:
                bq, bk, bv = layer.self_attn.qkv_proj.bias.split([q, kv, kv])
                sd.update({p + "self_attn.q_proj.bias": bq, p + "self_attn.k_proj.bias": bk,
                           p + "self_attn.v_proj.bias": bv})
        m.load_state_dict({k: v.detach().to(dtype) for k, v in sd.items()}, strict=False)
    return m.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def servelm_decode(engine: LLMEngine, prompt: list[int], new_tokens: int) -> dict:
    """Run one request alone; returns TTFT and decode tokens/s."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request("lat", prompt, params)
    t0 = time.perf_counter()
    first = None
    n = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            n = len(out.outputs[0].token_ids)
            if first is None and n:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_ms": (first - t0) * 1e3, "decode_tok_s": (n - 1) / (end - first), "tokens": n}


@torch.inference_mode()
def hf_decode(m, prompt: list[int], new_tokens: int, device) -> dict:
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n):
        sync(device)
        t = time.perf_counter()
        out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        return time.perf_counter() - t, out.shape[1] - ids.shape[1]

    timed(2)  # warm-up
    t1, _ = timed(1)
    tn, n = timed(new_tokens)
    return {"ttft_ms": t1 * 1e3, "decode_tok_s": (n - 1) / (tn - t1), "tokens": n}


def replay_ms(graph, reps: int) -> list[float]:
    """Milliseconds of each of `reps` replays of a CUDA graph, timed with events."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def copy_bandwidth(device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written (median of 20)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: dummy:llama-3-8b on CUDA, the embedded SmolLM2 on CPU")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    ap.add_argument("--no-async-scheduling", action="store_true",
                    help="CUDA: wait for each step's tokens before scheduling the next")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, help="int8, int4, nf4, nf4-dq (weight-only)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model over")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    model = args.model or ("dummy:llama-3-8b" if cuda else None)
    copy_bw = copy_bandwidth(torch.device("cuda")) if cuda else None  # before anything else uses the GPU
    torch.cuda.empty_cache() if cuda else None
    cfg = EngineConfig(model=model, max_num_seqs=4, max_model_len=2048, enforce_eager=args.enforce_eager,
                       async_scheduling=False if args.no_async_scheduling else None,
                       dtype=args.dtype, quantization=args.quantization, tensor_parallel_size=args.tensor_parallel_size,
                       gpu_memory_utilization=0.5, kv_cache_memory_bytes=None if cuda else 256 << 20)
    t = time.perf_counter()
    engine = LLMEngine(cfg)
    load_s = time.perf_counter() - t
    device, dtype = engine.device, engine.dtype
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 10000, (args.prompt_tokens,), generator=gen).tolist()
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": engine.model_name,
           "dtype": str(dtype).removeprefix("torch."), "new_tokens": args.new_tokens,
           "prompt_tokens": args.prompt_tokens, "engine_start_s": round(load_s, 1),
           "cuda_graphs": engine.runner.cuda_graph is not None, "async_scheduling": engine.async_scheduling,
           "torch": torch.__version__,
           "tensor_parallel_size": args.tensor_parallel_size}
    servelm_decode(engine, prompt, 8)  # warm-up
    runs = [servelm_decode(engine, prompt, args.new_tokens) for _ in range(args.repeats)]
    res["servelm"] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                      "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
                      "ms_per_token": 1e3 / statistics.median(r["decode_tok_s"] for r in runs)}
    if engine.runner.cuda_graph is not None and args.tensor_parallel_size == 1:  # GPU time of one decode step
        times = replay_ms(engine.runner.cuda_graph.graphs[1], 30)
        res["servelm"]["graph_replay_ms"] = statistics.median(times[5:])
    from servelm.engine.quant import kernels, model_weight_bytes

    weight_bytes = model_weight_bytes(engine.model)
    # which kernel each measured (layer shape, batch bucket) took, and the int4 layouts on CUDA
    res["kernel_choices"] = {",".join(map(str, k)): v for k, v in kernels.chosen().items()}
    res["int4_layouts"] = sorted({f"{m.out_features}x{m.in_features}:{m.layout}" for m in engine.model.modules()
                                  if getattr(m, "method", None) == "int4"})
    res["quantization"] = args.quantization
    res["weight_bytes"] = weight_bytes  # this rank's: under tensor parallelism each GPU reads its share
    engine.shutdown()
    mc = engine.model_config
    if not args.no_hf:
        dummy = bool(model) and model.startswith("dummy:")
        src = engine.model
        if dummy:  # random weights either way; free ours first (the 8B shape does not fit twice with a KV pool)
            del engine, src
            gc.collect()
            torch.cuda.empty_cache() if cuda else None
            src = None
        m = hf_model(src, mc, dtype, device, copy_weights=not dummy)
        import transformers

        r = hf_decode(m, prompt, args.new_tokens, device)
        res["transformers"] = {"version": transformers.__version__, **r}
        res["speedup_vs_transformers"] = res["servelm"]["decode_tok_s"] / r["decode_tok_s"]
        del m
        gc.collect()
    if cuda:
        roof = copy_bw / weight_bytes
        res["roofline"] = {"copy_bandwidth_TBps": copy_bw / 1e12, "tok_s": roof,
                           "servelm_fraction": res["servelm"]["decode_tok_s"] / roof}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
