"""The whole decoder forward of a GGUF-block model on the CPU in one native call per step.

:func:`native_forward_for` returns a :class:`NativeForward` when every linear of the model is a
:class:`~servelm.engine.quant.gguf_blocks.GGUFBlockLinear` of types the kernels run and the KV cache is
float32 on the CPU, else None (the runner then keeps the PyTorch model and attention backend). The
native forward reads the weights in their blocks and the engine's own paged KV cache tensors
(``[2, num_blocks, block_size, kv_heads, head_dim]`` per layer), so the scheduler, prefix caching and
preemption see no difference.
"""
from __future__ import annotations

import ctypes
import logging

import torch

from servelm.engine import native

log = logging.getLogger(__name__)

_MAX_PARTS = 4


class _Linear(ctypes.Structure):
    _fields_ = [("nparts", ctypes.c_int), ("qtype", ctypes.c_int * _MAX_PARTS), ("n", ctypes.c_int64 * _MAX_PARTS),
                ("w", ctypes.c_void_p * _MAX_PARTS), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
                ("k_norm", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear),
                ("down", _Linear), ("kv", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int), ("hidden", ctypes.c_int), ("n_heads", ctypes.c_int),
                ("n_kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int), ("inter", ctypes.c_int),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("num_blocks", ctypes.c_int64),
                ("block_size", ctypes.c_int), ("cos", ctypes.c_void_p), ("sin_signed", ctypes.c_void_p),
                ("layers", ctypes.POINTER(_Layer)), ("final_norm", ctypes.c_void_p)]


def _f32(t: torch.Tensor | None, keep: list) -> int | None:
    if t is None:
        return None
    t = t.detach().float().contiguous()
    keep.append(t)
    return t.data_ptr()


def _linear(mod, keep: list) -> _Linear | None:
    from servelm.engine.quant.gguf_blocks import GGUFBlockLinear

    if not isinstance(mod, GGUFBlockLinear):
        return None
    parts = mod.parts
    if len(parts) > _MAX_PARTS or any(q not in native.supported_types() for _, q, _ in parts):
        return None
    lin = _Linear()
    lin.nparts = len(parts)
    for i, (blocks, q, n) in enumerate(parts):
        keep.append(blocks)
        lin.qtype[i], lin.n[i], lin.w[i] = q, n, blocks.data_ptr()
    lin.bias = _f32(mod.bias, keep)
    return lin


class NativeForward:
    """Runs ``model``'s decoder layers natively; call it as the runner calls the model."""

    def __init__(self, model, kv_caches: list[torch.Tensor], layers: list[_Layer], keep: list):
        cfg = model.config
        self.model = model
        self._keep = keep  # the tensors whose pointers the structures hold
        self._layers = (_Layer * len(layers))(*layers)
        m = _Model()
        m.n_layers, m.hidden, m.n_heads, m.n_kv_heads = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        m.head_dim, m.inter, m.eps, m.scale = cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps, cfg.head_dim ** -0.5
        m.num_blocks, m.block_size = kv_caches[0].shape[1], kv_caches[0].shape[2]
        m.cos, m.sin_signed = _f32(model.rope.cos, keep), _f32(model.rope.sin_signed, keep)
        m.layers = self._layers
        m.final_norm = _f32(model.norm.weight, keep)
        self._model = m
        self._max_pos = model.rope.cos.shape[0]
        lib = native.library()
        lib.slk_forward.restype = ctypes.c_int
        lib.slk_forward.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int]
        self._fn = lib.slk_forward

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, layout) -> torch.Tensor:
        """Final (normed) hidden states ``[T, hidden]`` of the packed batch described by ``layout``; K/V of the
        new tokens are written into the cache at ``layout.slot_mapping``."""
        x = self.model.embed_tokens(input_ids).float().contiguous()
        n = len(layout.query_lens)
        pos = positions.contiguous()
        if pos.numel() and int(pos.max()) >= self._max_pos:
            raise ValueError(f"position {int(pos.max())} is past the model's {self._max_pos} positions")
        slots = layout.slot_mapping.contiguous()
        tables = layout.block_tables.to(torch.int32).contiguous()
        qlens = (ctypes.c_int * n)(*layout.query_lens)
        ctx = (ctypes.c_int * n)(*layout.context_lens)
        rc = self._fn(ctypes.byref(self._model), x.data_ptr(), x.shape[0], pos.data_ptr(), slots.data_ptr(), n,
                      ctypes.addressof(qlens), ctypes.addressof(ctx), tables.data_ptr(), tables.shape[1])
        if rc != 0:
            raise RuntimeError("the native forward rejected a weight type")
        return x


def native_forward_for(model, kv_caches: list[torch.Tensor], device: torch.device) -> NativeForward | None:
    """A :class:`NativeForward` for ``model`` when it can run natively here, else None (the reason is logged)."""
    if device.type != "cpu" or not kv_caches or kv_caches[0].dtype != torch.float32 or kv_caches[0].dim() != 5:
        return None
    if not native.available() or getattr(model.embed_tokens, "dtype", torch.float32) != torch.float32:
        return None
    cfg = model.config
    if cfg.num_heads % cfg.num_kv_heads:
        return None
    keep: list = []
    layers = []
    for i, layer in enumerate(model.layers):
        att, mlp = layer.self_attn, layer.mlp
        lins = [_linear(att.qkv_proj, keep), _linear(att.o_proj, keep), _linear(mlp.gate_up_proj, keep),
                _linear(mlp.down_proj, keep)]
        if any(lin is None for lin in lins):
            log.info("native CPU forward not used: layer %d has a linear the native kernels do not run", i)
            return None
        ly = _Layer()
        ly.in_norm = _f32(layer.input_layernorm.weight, keep)
        ly.post_norm = _f32(layer.post_attention_layernorm.weight, keep)
        ly.q_norm = _f32(att.q_norm.weight if att.q_norm is not None else None, keep)
        ly.k_norm = _f32(att.k_norm.weight if att.k_norm is not None else None, keep)
        ly.qkv, ly.o, ly.gate_up, ly.down = lins
        ly.kv = kv_caches[i].data_ptr()
        layers.append(ly)
    return NativeForward(model, kv_caches, layers, keep)
