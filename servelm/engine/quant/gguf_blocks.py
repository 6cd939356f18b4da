"""GGUF blocks as they are in the file: a Linear and an Embedding whose weights never leave their blocks.

A GGUF matrix of ``n`` output features by ``k`` inputs is ``n`` rows of blocks, each block a run of 32
(or 256, K-quants) consecutive inputs with its own scales, so a row's bytes are the row. Fusing q|k|v
or gate|up is concatenating rows; undoing llama.cpp's q/k permutation is reordering rows: both
lossless. The products and row lookups run in ``servelm.engine.native`` (llama.cpp's kernels' maths:
activations quantized to 8 bits inside), so the weights a product uses are exactly
``gguf.quants.dequantize`` of the file.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import QuantLinear


def _native():
    from servelm.engine import native  # noqa: PLC0415 (a compiled library: loaded where it is first used)

    return native


def type_name(qtype: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(qtype).name


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of ``k`` inputs in ``qtype``; ValueError when ``k`` is not a multiple of its block."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    if k % block:
        raise ValueError(f"{type_name(qtype)} rows are whole blocks of {block} inputs; {k} is not a multiple")
    return k // block * size


class GGUFBlockLinear(QuantLinear):
    """A drop-in for nn.Linear (``y = x W^T + b``) over GGUF blocks.

    ``parts``: ``(blocks uint8 [n_i, row_bytes_i], qtype, n_i)`` concatenated along the output features,
    one part per source tensor whose type differs from its neighbour's (q|k|v of one type is one part).
    Activations are float32 (the kernels' input); the output is cast back to the input's dtype."""

    method = "gguf"

    def __init__(self, parts: list[tuple[torch.Tensor, int, int]], in_features: int,
                 bias: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = sum(n for _, _, n in parts)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._types: list[tuple[int, int]] = []
        for i, (blocks, qtype, n) in enumerate(parts):
            want = (n, row_bytes(qtype, in_features))
            if blocks.dtype != torch.uint8 or tuple(blocks.shape) != want:
                raise ValueError(f"part {i} of a {type_name(qtype)} layer: blocks {tuple(blocks.shape)} "
                                 f"{blocks.dtype}, expected uint8 {want}")
            self.register_buffer(f"blocks_{i}", blocks.contiguous())
            self._types.append((qtype, n))

    @property
    def parts(self) -> list[tuple[torch.Tensor, int, int]]:
        """The stored blocks, in output-feature order: ``[(blocks, qtype, n), ...]``."""
        return [(getattr(self, f"blocks_{i}"), q, n) for i, (q, n) in enumerate(self._types)]

    @property
    def qtypes(self) -> list[str]:
        """The GGUF type name of each part, e.g. ``["Q4_K", "Q6_K"]``."""
        return [type_name(q) for q, _ in self._types]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nat, k = _native(), self.in_features
        w = [nat.dequantize(b, q, n, k) for b, q, n in self.parts]
        return (w[0] if len(w) == 1 else torch.cat(w)).to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        nat, k = _native(), self.in_features
        x = x.float().contiguous()
        ys = [nat.matmul(x, b, q, n, k) for b, q, n in self.parts]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method=gguf "
                f"{'|'.join(self.qtypes)}")


class GGUFBlockEmbedding(nn.Module):
    """A drop-in for nn.Embedding over GGUF blocks: a lookup dequantizes only the rows it asks for.
    A tied lm_head is a :class:`GGUFBlockLinear` over this module's ``blocks`` (the same tensor)."""

    def __init__(self, blocks: torch.Tensor, qtype: int, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        want = (num_embeddings, row_bytes(qtype, embedding_dim))
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != want:
            raise ValueError(f"{type_name(qtype)} embedding blocks {tuple(blocks.shape)}, expected uint8 {want}")
        self.register_buffer("blocks", blocks.contiguous())
        self.qtype, self.num_embeddings, self.embedding_dim = qtype, num_embeddings, embedding_dim
        self.dtype = torch.float32  # what lookups return; the model's compute dtype (set by the loader)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1)
        out = _native().dequantize(self.blocks, self.qtype, self.num_embeddings, self.embedding_dim, rows=rows)
        return out.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def as_linear(self) -> GGUFBlockLinear:
        """The tied output projection: a Linear over these very blocks (no copy)."""
        return GGUFBlockLinear([(self.blocks, self.qtype, self.num_embeddings)], self.embedding_dim)

    def weight_nbytes(self) -> int:
        return self.blocks.numel()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, method=gguf {type_name(self.qtype)}"
