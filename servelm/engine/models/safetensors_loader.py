"""Hugging Face safetensors directories, sharded (``model.safetensors.index.json``) or not."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from servelm.engine.models.config import ModelConfig, ModelLoadError


def read_safetensors_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Return the config and all tensors (HF names) of a HF model directory."""
    from servelm.engine.models.loader import read_hf_config

    cfg = ModelConfig.from_hf_dict(read_hf_config(path), name=path.name)
    gen_cfg = path / "generation_config.json"
    if gen_cfg.exists():
        import json

        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    tensors[name] = fh.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"cannot read {f}: {e}") from e
    if cfg.tie_word_embeddings is False and "lm_head.weight" not in tensors:
        cfg.tie_word_embeddings = True  # some checkpoints omit the tied head without saying so
    return cfg, tensors
