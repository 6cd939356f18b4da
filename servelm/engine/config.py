"""Engine settings, one dataclass (vLLM's ``EngineArgs`` in spirit)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(slots=True)
class EngineConfig:
    """Everything that shapes an engine. ``model=None`` is the embedded SmolLM2 GGUF."""

    model: str | None = None  # also a Hugging Face repo id ("org/name"), looked up in the HF cache
    tokenizer: str | None = None  # default: the model's own; else a directory or repo id with tokenizer files
    skip_tokenizer_init: bool = False  # vLLM's: token-id prompts only, outputs carry token ids and no text
    download_dir: str | None = None  # the Hugging Face cache for repo ids (default HF_HUB_CACHE)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    quantization: str | None = None  # None, int8, int4, nf4, nf4-dq (see engine/quant)
    quant_calibration: str | None = None  # text file; nf4/nf4-dq search block scales with its statistics
    device: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int | None = None  # cap on one prompt's tokens per step
    max_model_len: int | None = None  # default: the model's context window
    kv_cache_memory_bytes: int | None = None  # default: from free memory (CPU: memory.cpu_kv_budget; CUDA: profiled)
    num_kv_blocks: int | None = None  # overrides the memory budget (tests of preemption)
    gpu_memory_utilization: float = 0.90
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False  # CUDA: skip capturing CUDA graphs for decode
    async_scheduling: bool | None = None  # overlap host work with the device's decode steps (None: on CUDA)
    tensor_parallel_size: int = 1  # processes (GPUs) the model is split over; see engine/parallel.py
    seed: int = 0
    # vLLM's: {"method": "ngram", "num_speculative_tokens": 4, ...} as a dict or its JSON text (see
    # engine/speculative/config.py); None: no speculative decoding
    speculative_config: dict | str | None = None
    served_model_name: str | None = None
    show_progress: bool = False  # a progress bar while weights load (the CLI turns it on)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def check_parallel(self, device: torch.device) -> None:
        """Raises ValueError for a tensor-parallel size this machine or these settings cannot run."""
        tp = self.tensor_parallel_size
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
        if tp == 1:
            return
        if self.quantization:
            raise ValueError("tensor parallelism does not combine with quantization yet; drop one of them")
        if device.type == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs; this machine has {torch.cuda.device_count()}")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The compute dtype; raises ValueError for an unknown name."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            return _DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of auto, float32, bfloat16, float16") from None
