"""NF4 (4-bit NormalFloat, QLoRA) weight-only, one scale per group, with optional double
quantization: the per-group scales are themselves quantized to int8 in blocks of `dq_block`
with one float32 scale per block and one float32 mean (QLoRA section 3).

Each weight is NF4_CODE[code] * scale[group]. Without calibration the scale is the group's absmax
(QLoRA). With activation statistics from calibration text (`importance`, see calibrate.py) each
group's scale is searched instead: candidates +-f * absmax for f in `SCALE_FACTORS`, keeping the
one with the least importance-weighted squared error (llama.cpp's imatrix-weighted scale search).
The negative candidates mirror the grid, whose 8 positive and 7 negative levels then fall the
other way round; the storage and the decoding are unchanged."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .base import QuantLinear, dtype_key

# The 16 NF4 levels from the QLoRA paper / bitsandbytes (quantiles of N(0,1), scaled to [-1, 1]).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230850220947, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


# Fractions of a group's absmax tried as its scale when calibration statistics are given.
SCALE_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_nf4(w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None,
                 rows_per_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (codes uint8 [N,K] in 0..15, scale float32 [N, K/g]); w ≈ NF4_CODE[codes] * scale.

    `importance` [K] (mean squared input activation, calibrate.input_importance) switches from
    absmax scales to the weighted search described in the module docstring."""
    n, k = w.shape
    mids, levels = _MIDPOINTS.to(w.device), NF4_CODE.to(w.device)
    codes_out, scales_out = [], []
    for wc in w.split(rows_per_chunk):  # bounds the temporary memory of the search
        wg = wc.float().reshape(-1, k // group_size, group_size)
        absmax = wg.abs().amax(-1, keepdim=True).clamp(min=1e-10)
        best = absmax
        if importance is not None:
            imp = importance.float().to(w.device).reshape(1, k // group_size, group_size)
            best_err = None
            for f in SCALE_FACTORS:
                for s in (absmax * f, absmax * -f):
                    err = (imp * (levels[torch.bucketize(wg / s, mids)] * s - wg) ** 2).sum(-1, keepdim=True)
                    if best_err is None:
                        best, best_err = s, err
                    else:
                        better = err < best_err
                        best, best_err = torch.where(better, s, best), torch.minimum(err, best_err)
        codes_out.append(torch.bucketize(wg / best, mids).reshape(-1, k).to(torch.uint8))
        scales_out.append(best[..., 0])
    return torch.cat(codes_out), torch.cat(scales_out)


def double_quantize(absmax: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (int8 codes padded to whole blocks, float32 scale per block, float32 mean) with
    absmax ≈ codes * scale[block] + mean. Centering first makes the int8 range go further."""
    flat = absmax.reshape(-1).float()
    mean = flat.mean()
    centered = flat - mean
    pad = (-centered.numel()) % block
    blocks = F.pad(centered, (0, pad)).reshape(-1, block)
    scale = (blocks.abs().amax(-1) / 127.0).clamp(min=1e-12)
    # codes stay padded to whole blocks (< dq_block bytes extra) so decoding is one reshape
    q = torch.round(blocks / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)
    return q, scale, mean.reshape(1)


class NF4Linear(QuantLinear):
    """y = x W^T with W dequantized from NF4 per call through a 256-entry byte table (no
    packed NF4 kernel exists in torch on CPU); compute dtype picked by measurement."""

    method = "nf4"

    def __init__(self, linear: nn.Linear, group_size: int, double_quant: bool = False, dq_block: int = 256,
                 importance: torch.Tensor | None = None) -> None:
        super().__init__(linear)
        n, k = self.out_features, self.in_features
        if k % group_size:
            raise ValueError(f"nf4 group_size {group_size} does not divide in_features {k} "
                             f"(layer {n}x{k}); pick a group size that divides {k}")
        self.group_size = group_size
        self.double_quant = double_quant
        self.method = "nf4-dq" if double_quant else "nf4"
        dev = linear.weight.device
        # `absmax` keeps QLoRA's name; with calibration it is the searched (possibly negative) scale.
        codes, absmax = quantize_nf4(linear.weight.detach(), group_size, importance)
        self.register_buffer("qweight", (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous())
        if double_quant:
            q, scale, mean = double_quantize(absmax, dq_block)
            self.dq_block = dq_block
            self.register_buffer("absmax_q", q.to(dev))
            self.register_buffer("absmax_scale", scale.to(dev))
            self.register_buffer("absmax_mean", mean.to(dev))
        else:
            self.register_buffer("absmax", absmax.reshape(-1).to(dev))
        self._tables: dict[tuple, torch.Tensor] = {}

    def _absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        n = self.out_features * (self.in_features // self.group_size)
        blocks = self.absmax_q.view(-1, self.dq_block).float() * self.absmax_scale[:, None] + self.absmax_mean
        return blocks.reshape(-1)[:n]

    def _table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # byte b -> (code[b & 15], code[b >> 4]): one gather decodes two weights.
        t = self._tables.get((dtype, device))
        if t is None:
            b = torch.arange(256)
            t = torch.stack([NF4_CODE[b & 15], NF4_CODE[b >> 4]], -1).to(device=device, dtype=dtype)
            self._tables[(dtype, device)] = t
        return t

    def _dequant_weight(self, dtype: torch.dtype) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        # Recomputed per call rather than cached, so double quantization saves memory at run
        # time too; it is ~1/g of the work of decoding the codes.
        scale = self._absmax().to(dtype)
        w = F.embedding(self.qweight.to(torch.int32), self._table(dtype, self.qweight.device))
        return (w.reshape(n, k // g, g) * scale.reshape(n, k // g, 1)).reshape(n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequant_weight(torch.float32).to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        cands = {"dequant_native": lambda: F.linear(x, self._dequant_weight(x.dtype))}
        if x.dtype == torch.float32:
            cands["dequant_bf16"] = lambda: F.linear(x.to(torch.bfloat16), self._dequant_weight(torch.bfloat16))
        key = ("nf4", x.device.type, dtype_key(x), self.out_features, self.in_features, self.group_size,
               kernels.batch_bucket(x.shape[0]))
        return cands[kernels.choose(key, cands, x.device)]()
