"""GGUF files through the ``gguf`` package: kept in their blocks (the default), or dequantized to float.

:func:`read_gguf_blocks` reads each tensor through the reader's memory map, one at a time, as the raw
bytes of its rows (``BlockTensor``), so no float copy of any matrix exists at any point;
:func:`read_gguf` dequantizes each tensor to float (the parity path, ``--quantization none``).

llama.cpp's converter permutes the rows of q and k for the ``llama`` architecture
(interleaved rotary pairs); we undo that so the weights match the HF layout that
``llama.py`` and transformers use. In blocks that is a reordering of whole rows of bytes: a row's
blocks run along the input dimension, so nothing is re-rounded.
"""
from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from servelm.engine.models.config import LLAMA_ARCHS, SUPPORTED_ARCHS, ModelConfig, ModelLoadError

# llama.cpp's ``general.architecture`` names where they differ from transformers' model_type
# (Gemma's GGUFs are not read: llama.cpp's converter stores its norms as 1 + w, another layout)
GGUF_ARCHS = {"qwen3moe": "qwen3_moe"}
# stacked expert matrices (GGUF ``[E, rows, inputs]``) -> transformers' stacked names
_EXPERT_NAMES = {"ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
                 "ffn_down_exps": "mlp.experts.down_proj"}

# The types the block path runs (servelm.engine.native's kernels); every type inside common Q4_K_M,
# Q5_K_M, Q6_K and Q8_0 files. Others (Q2_K, Q3_K, IQ*) load only dequantized (--quantization none).
BLOCK_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


@dataclass(slots=True)
class BlockTensor:
    """One GGUF matrix as stored: ``n`` rows (output features) of ``k`` inputs in GGML type ``qtype`` (a
    ``gguf.GGMLQuantizationType`` value). ``data`` is the file's bytes ``[n, row_bytes]``, still a view of
    the memory map; :meth:`copy_into` copies them out once (un-permuting llama's q/k rows on the way when
    ``heads`` is set) and then lets the mapped pages go."""

    data: np.ndarray
    qtype: int
    n: int
    k: int
    heads: int | None = None  # llama/mistral q/k: rows to un-permute, per head
    release: object = None  # callable: drop the mapped pages once copied

    @property
    def type_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.qtype).name

    @property
    def row_bytes(self) -> int:
        return self.data.shape[1]

    def copy_into(self, out: np.ndarray) -> None:
        """Write the rows, in the HF order, into ``out`` (uint8 ``[n, row_bytes]``)."""
        if self.heads:
            h, rb = self.heads, self.row_bytes
            # _unpermute, done as one strided copy: out viewed [h, 2, n/h/2] <- data viewed [h, n/h/2, 2]
            np.copyto(out.reshape(h, 2, self.n // h // 2, rb),
                      self.data.reshape(h, self.n // h // 2, 2, rb).swapaxes(1, 2))
        else:
            np.copyto(out, self.data)
        if self.release is not None:
            self.release()

    def tensor(self) -> torch.Tensor:
        """The rows as a new uint8 tensor ``[n, row_bytes]`` (HF order)."""
        out = torch.empty(self.n, self.row_bytes, dtype=torch.uint8)
        self.copy_into(out.numpy())
        return out


# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the MoE router
    **_EXPERT_NAMES,
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _open(path: Path):
    """The reader over ``path`` and its architecture; raises ModelLoadError for an unreadable or truncated
    file (naming the first tensor that runs past its end) and for an architecture servelm does not run."""
    import gguf

    class CheckedReader(gguf.GGUFReader):
        # GGUFReader slices tensors out of the memory map without checking the file's length, so a truncated
        # file would surface as a numpy reshape error; check each tensor's extent against the file first.
        def _build_tensors(self, start_offs, fields):
            for f in fields:
                _, name_data, _, dims, raw_dtype, offset = f.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qt = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise ModelLoadError(f"{path.name}: tensor {name} has GGML type {int(raw_dtype[0])}, which "
                                         "the gguf package does not know") from None
                block, size = gguf.GGML_QUANT_SIZES[qt]
                n_elems = int(np.prod(dims))
                if n_elems % block:
                    raise ModelLoadError(f"{path.name}: tensor {name} ({qt.name}) has {n_elems} elements, not a "
                                         f"whole number of {block}-element blocks")
                end = int(start_offs + offset[0]) + n_elems // block * size
                if end > len(self.data):
                    raise ModelLoadError(
                        f"{path.name}: tensor {name} ({qt.name}, shape {list(map(int, dims))}) ends at byte {end}, "
                        f"past the end of the file ({len(self.data)} bytes): the file is truncated or corrupt")
            super()._build_tensors(start_offs, fields)

    try:
        reader = CheckedReader(str(path))
    except ModelLoadError:
        raise
    except Exception as e:  # the reader raises ValueError/struct errors on corrupt files
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
    arch = _field(reader, "general.architecture")
    if GGUF_ARCHS.get(arch, arch) not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"{path.name}: unsupported architecture {arch!r}; servelm runs {', '.join(SUPPORTED_ARCHS)}")
    return reader, arch


def _rope_freqs(cfg: ModelConfig, t) -> None:
    import gguf

    # Llama 3.1+ (llama3 rope scaling): llama.cpp's converter writes the per-frequency divisors
    # instead of the scaling parameters, and its rotary embedding divides each frequency by them
    factors = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
    cfg.rope_scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}


def read_gguf(path: Path, progress: bool = False, dtype: torch.dtype = torch.float32, opened=None
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Return (config, HF-named tensors dequantized to ``dtype``, HF name -> GGUF quant type).

    Each tensor is cast to ``dtype`` as it is read, so a bfloat16 load never holds the model in float32.
    ``opened``: what :func:`open_gguf` returned for ``path`` (parsing the header of a file with a large
    vocabulary takes seconds). Raises ModelLoadError."""
    import gguf

    reader, arch = opened or _open(path)
    cfg = _config(reader, arch, path)
    tensors: dict[str, torch.Tensor] = {}
    qtypes: dict[str, str] = {}
    for t, hf_name in _model_tensors(reader, cfg, path, progress):
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelLoadError(f"{path.name}: tensor {t.name} has unsupported type {t.tensor_type.name}") from e
        w = torch.from_numpy(np.array(arr, dtype=np.float32)).to(dtype)  # a copy: F32 tensors are read-only maps
        del arr
        if arch in ("llama", "mistral"):
            if hf_name.endswith("q_proj.weight"):
                w = _unpermute(w, cfg.num_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = _unpermute(w, cfg.num_kv_heads)
        tensors[hf_name] = w
        qtypes[hf_name] = t.tensor_type.name
    for i in range(cfg.num_layers):  # stacked experts: gate and up into transformers' gate_up_proj [E, 2I, H]
        p = f"model.layers.{i}.mlp.experts."
        if p + "gate_proj.weight" in tensors:
            tensors[p + "gate_up_proj"] = torch.cat([tensors.pop(p + "gate_proj.weight"),
                                                     tensors.pop(p + "up_proj.weight")], dim=1)
            tensors[p + "down_proj"] = tensors.pop(p + "down_proj.weight")
    if "lm_head.weight" not in tensors:
        cfg.tie_word_embeddings = True
    return cfg, tensors, qtypes



def _model_tensors(reader, cfg: ModelConfig, path: Path, progress: bool):
    """Yields (GGUF tensor, its HF name) for the tensors the model holds; ``rope_freqs`` goes into ``cfg``."""
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress):
        if t.name == "rope_freqs.weight":
            _rope_freqs(cfg, t)
            continue
        hf_name = _hf_name(t.name)
        if hf_name is not None:
            yield t, hf_name


def read_gguf_blocks(path: Path, progress: bool = False, opened=None
                     ) -> tuple[ModelConfig, dict[str, BlockTensor | torch.Tensor], dict[str, str]]:
    """Return (config, HF-named weights, HF name -> GGUF type): each matrix a :class:`BlockTensor` of the
    file's own bytes (q/k rows of llama/mistral un-permuted), each vector (norms, biases) float32.

    Nothing is read yet: each BlockTensor is a view of the reader's memory map, copied once, tensor by
    tensor, into the module that holds it (:meth:`BlockTensor.copy_into`), its pages dropped from this
    process's resident set right after, so loading peaks near the file's size. Raises ModelLoadError naming the file, tensor and type for a type the kernels do not run,
    a truncated file or a tensor whose shape disagrees with the metadata. ``opened`` as for read_gguf."""
    import gguf

    reader, arch = opened or _open(path)
    cfg = _config(reader, arch, path)
    tensors: dict[str, BlockTensor | torch.Tensor] = {}
    qtypes: dict[str, str] = {}
    for t, hf_name in _model_tensors(reader, cfg, path, progress):
        kind = t.tensor_type.name
        dims = [int(d) for d in t.shape]
        if len(dims) == 1 or all(d == 1 for d in dims[1:]):  # norms and biases: small, float
            try:
                vec = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise ModelLoadError(f"{path.name}: tensor {t.name} has unsupported type {kind}") from e
            tensors[hf_name] = torch.from_numpy(np.array(vec, dtype=np.float32).reshape(-1))
        else:
            if kind not in BLOCK_TYPES:
                raise ModelLoadError(
                    f"{path.name}: tensor {t.name} is {kind}, which servelm does not run in its blocks (it runs "
                    f"{', '.join(BLOCK_TYPES)}); load it dequantized with --quantization none, or use a file "
                    f"quantized to one of those types")
            if len(dims) != 2:
                raise ModelLoadError(f"{path.name}: tensor {t.name} ({kind}) has shape {dims}; a matrix was expected")
            k, n = dims  # GGUF lists dimensions innermost first: inputs, then rows
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            heads = None
            if arch in ("llama", "mistral") and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = cfg.num_heads if hf_name.endswith("q_proj.weight") else cfg.num_kv_heads
            data = t.data.reshape(-1).view(np.uint8).reshape(n, k // block * size)  # a view: nothing read yet
            tensors[hf_name] = BlockTensor(data, int(t.tensor_type), n, k, heads,
                                           functools.partial(_drop_pages, reader, t.data_offset, int(t.n_bytes)))
        qtypes[hf_name] = kind
    if "lm_head.weight" not in tensors:
        cfg.tie_word_embeddings = True
    check_shapes(cfg, tensors, path)
    return cfg, tensors, qtypes


def open_gguf(path: Path):
    """(reader, architecture) of ``path``, for :func:`projection_type`, :func:`read_gguf` and
    :func:`read_gguf_blocks`; raises ModelLoadError for an unreadable, truncated or unsupported file."""
    return _open(path)


def projection_type(opened) -> str | None:
    """The GGUF type of the first layer's q projection (what a file is "quantized to"), or None."""
    reader, _ = opened
    return next((t.tensor_type.name for t in reader.tensors if t.name == "blk.0.attn_q.weight"), None)


def _drop_pages(reader, offset: int, nbytes: int) -> None:
    """Tell the kernel this process is done with the mapped pages of one tensor (they stay in the page
    cache, but leave our resident set), so copying a model out of its map does not count it twice."""
    m = getattr(reader.data, "_mmap", None)  # numpy.memmap keeps the mmap object here
    if m is None or not hasattr(m, "madvise"):
        return
    page = mmap.PAGESIZE
    start = offset // page * page
    try:
        m.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)
    except (OSError, ValueError):  # not supported on this platform/mapping: only RSS is affected
        pass


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> the shape ([out, in] or [n]) the metadata implies, for every weight the model reads."""
    h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
        if cfg.attention_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
        if cfg.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return out


def check_shapes(cfg: ModelConfig, tensors: dict, path: Path) -> None:
    """Raises ModelLoadError naming the tensor when a weight's shape disagrees with the metadata, or one
    the model needs is missing."""
    for name, want in expected_shapes(cfg).items():
        t = tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{path.name}: weight {name!r} is missing from the file")
        got = (t.n, t.k) if isinstance(t, BlockTensor) else tuple(t.shape)
        if got != want:
            kind = t.type_name if isinstance(t, BlockTensor) else "float"
            raise ModelLoadError(f"{path.name}: tensor {_gguf_name(name)} ({kind}) has shape {list(got)} "
                                 f"(rows, inputs), but the metadata implies {list(want)}")


def _gguf_name(hf_name: str) -> str:
    """The GGUF name of an HF-named weight (for messages)."""
    for g, h in _TOP_NAMES.items():
        if hf_name.startswith(h + "."):
            return g + hf_name[len(h):]
    _, _, idx, rest = hf_name.split(".", 3)
    stem, _, kind = rest.rpartition(".")
    rev = {v: k for k, v in _LAYER_NAMES.items()}
    return f"blk.{idx}.{rev.get(stem, stem)}.{kind}"


def _hf_name(name: str) -> str | None:
    stem, _, kind = name.rpartition(".")  # kind: weight | bias
    if stem.startswith("blk."):
        _, idx, part = stem.split(".", 2)
        hf = _LAYER_NAMES.get(part)
        return f"model.layers.{idx}.{hf}.{kind}" if hf else None
    hf = _TOP_NAMES.get(stem)
    return f"{hf}.{kind}" if hf else None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(reader, arch: str, path: Path) -> ModelConfig:
    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if heads is None or hidden is None:
        raise ModelLoadError(f"{path.name}: GGUF metadata lacks {arch}.attention.head_count/embedding_length")
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    rope_scaling = None
    if get("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    name = _field(reader, "general.name") or path.stem
    cfg = ModelConfig(
        arch=GGUF_ARCHS.get(arch, arch),
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings=False,
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        name=path.stem,
        eos_token_ids=sorted({int(x) for x in (eos, eot) if x is not None}),
    )
    if get("expert_count"):  # llama.cpp's qwen3moe/qwen2moe: softmax router, top-k renormalised for Qwen3
        cfg.num_experts, cfg.num_experts_per_tok = int(get("expert_count")), int(get("expert_used_count"))
        cfg.moe_intermediate_size = int(get("expert_feed_forward_length") or cfg.intermediate_size)
        cfg.norm_topk_prob = arch == "qwen3moe"
        cfg.qk_norm = cfg.qk_norm or arch == "qwen3moe"
        if cfg.arch != "qwen3_moe":
            raise ModelLoadError(f"{path.name}: servelm reads mixture-of-experts GGUFs of the qwen3moe architecture "
                                 f"only, not {arch!r}; load the safetensors checkpoint instead")
    return cfg
