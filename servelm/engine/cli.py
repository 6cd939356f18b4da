"""The command-line flags that choose and shape a model, shared by every command that loads one
(``servelm generate`` and ``servelm chat``, in servelm/terminal.py)."""
from __future__ import annotations

import argparse

from servelm.engine.config import EngineConfig


def add_engine_args(p) -> None:
    """Adds the model flags to an argparse parser or argument group."""
    p.add_argument("--model", default=None,
                   help="GGUF file, HF directory or dummy:<shape> (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--quantization", default=None,
                   help="int8, int4, nf4 or nf4-dq (weight-only); +lm_head or +lm_head:int8 for the output layer "
                        "(default: none)")
    p.add_argument("--quant-calibration", default=None, metavar="TEXT_FILE",
                   help="nf4/nf4-dq: search block scales weighted by activations on this text (default: none)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto, CUDA when there is one)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context window in tokens (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests run at once (default: 64)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="memory for the KV cache (default: 1 GiB on CPU; on CUDA, 90 %% of GPU memory less the weights)")
    # the old spelling; 'servelm serve' and the engine's config say kv_cache_memory_bytes
    p.add_argument("--kv-cache-memory", dest="kv_cache_memory_bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model over (default: 1)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' (default: none)')


def engine_config(args: argparse.Namespace, **extra) -> EngineConfig:
    """Returns the ``EngineConfig`` the flags of ``add_engine_args`` describe."""
    return EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization, device=args.device,
                        quant_calibration=args.quant_calibration,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                        tensor_parallel_size=args.tensor_parallel_size,
                        speculative_config=args.speculative_config, **extra)
