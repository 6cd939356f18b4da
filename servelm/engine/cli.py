"""``servelm generate`` and ``servelm chat``: the engine from a terminal, streaming."""
from __future__ import annotations

import argparse
import sys
import uuid

from servelm.engine.config import EngineConfig
from servelm.engine.llm_engine import LLMEngine
from servelm.engine.sampling_params import InvalidRequestError, SamplingParams


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags that choose and shape the model; shared by every command that loads one."""
    p.add_argument("--model", default=None, help="GGUF file, HF directory or dummy:<shape> (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--quantization", default=None,
                   help="int8, int4, nf4 or nf4-dq (weight-only); +lm_head or +lm_head:int8 for the output layer")
    p.add_argument("--quant-calibration", default=None, metavar="TEXT_FILE",
                   help="nf4/nf4-dq: search block scales weighted by activations on this text")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache budget in bytes")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model over")


def engine_config(args: argparse.Namespace, **extra) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization, device=args.device,
                        quant_calibration=args.quant_calibration,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        kv_cache_memory_bytes=args.kv_cache_memory,
                        tensor_parallel_size=args.tensor_parallel_size, **extra)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    g.add_argument("prompt")
    add_engine_args(g)
    _sampling_args(g)
    g.set_defaults(func=_generate)
    c = sub.add_parser("chat", help="multi-turn chat in the terminal with the model's chat template")
    c.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    add_engine_args(c)
    _sampling_args(c)
    c.set_defaults(func=_chat)


def _params(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _stream(engine: LLMEngine, prompt: str, params: SamplingParams) -> str:
    rid = uuid.uuid4().hex
    engine.add_request(rid, prompt, params)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            delta = out.outputs[0].delta_text
            text += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return text


def _generate(args) -> int:
    engine = LLMEngine(engine_config(args, show_progress=True))
    try:
        _stream(engine, args.prompt, _params(args))
    except InvalidRequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _chat(args) -> int:
    engine = LLMEngine(engine_config(args, show_progress=True))
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"Chatting with {engine.model_name}. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        sys.stdout.write("assistant> ")
        try:
            reply = _stream(engine, prompt, _params(args))
        except InvalidRequestError as e:  # e.g. the conversation outgrew the context window
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
    return 0
