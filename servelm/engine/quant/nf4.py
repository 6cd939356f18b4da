"""NF4 (4-bit NormalFloat, QLoRA) weight-only, one scale per group, with optional double
quantization: the per-group scales are themselves quantized to int8 in blocks of `dq_block`
with one float32 scale per block and one float32 mean (QLoRA section 3).

Each weight is NF4_CODE[code] * scale[group]. Without calibration the scale is the group's absmax
(QLoRA). With activation statistics from calibration text (`importance`, see calibrate.py) each
group's scale is searched instead, for all groups at once (llama.cpp's IQ4_NL / imatrix search):
for each candidate that maps the group's absmax onto level +-t (t in `SEARCH_TARGETS`, both
signs), the codes are the nearest levels, the scale is the importance-weighted least-squares
scale for those codes, and the candidate with the least weighted error
sum_j imp_j (w_j - s * NF4[code_j])^2 wins. With double quantization the search then looks
again at the int8 scale codes around the chosen scale (`DQ_NEIGHBOURS`), so the scale it keeps
is one the 8-bit storage can hold. A negative scale only mirrors the grid, whose 8 positive and
7 negative levels then fall the other way round; the storage and the decoding are unchanged."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantLinear, dtype_key

# The 16 NF4 levels from the QLoRA paper / bitsandbytes (quantiles of N(0,1), scaled to [-1, 1]).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230850220947, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2

# Levels tried for a group's largest weight (|w|max / scale) in the calibrated search, each with
# both signs; the least-squares step moves the scale between them.
SEARCH_TARGETS = torch.linspace(0.6, 1.1, 8)
# int8 scale codes tried around the chosen one once the scales are double-quantized.
DQ_NEIGHBOURS = (-2, -1, 0, 1, 2)


def _codes(wg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 level of every weight: wg [..., g] / scale [..., 1] -> codes in 0..15."""
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group stays 0
    return torch.bucketize(wg / scale, _MIDPOINTS.to(wg.device))


def _weighted_err(wg: torch.Tensor, imp: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weighted error of groups wg [B, g] at candidate scales [B, C] -> [B, C]."""
    lv = NF4_CODE.to(wg.device)[_codes(wg[:, None, :], scale[..., None])]
    return (imp[:, None, :] * (wg[:, None, :] - scale[..., None] * lv) ** 2).sum(-1)


def _group_importance(importance: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    k = importance.numel()
    return importance.float().reshape(1, k // group_size, group_size).expand(n, -1, -1).reshape(-1, group_size)


def search_scales(w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None,
                  groups_per_chunk: int = 8192) -> torch.Tensor:
    """Returns the float32 scale of every group [N, K/g]: absmax, or with `importance` [K] (mean
    squared input activation, calibrate.input_importance) the weighted search of the module
    docstring, vectorised over groups and candidates."""
    n, k = w.shape
    wg = w.float().reshape(-1, group_size)
    absmax = wg.abs().amax(-1, keepdim=True).clamp(min=1e-10)
    if importance is None:
        return absmax.reshape(n, k // group_size)
    levels = NF4_CODE.to(w.device)
    targets = SEARCH_TARGETS.to(w.device)
    targets = torch.cat([targets, -targets])
    imp = _group_importance(importance.to(w.device), n, group_size)
    out = []
    for wc, ic, am in zip(wg.split(groups_per_chunk), imp.split(groups_per_chunk), absmax.split(groups_per_chunk)):
        lv = levels[_codes(wc[:, None, :], (am / targets)[..., None])]  # [b, C, g]
        sqx = torch.bmm(lv, (ic * wc)[..., None])[..., 0]  # sum imp * w * level
        sq2 = torch.bmm(lv * lv, ic[..., None])[..., 0].clamp(min=1e-30)  # sum imp * level^2
        # least-squares scale per candidate; its error is sum(imp w^2) - sqx^2 / sq2
        best = (sqx * sqx / sq2).argmax(-1, keepdim=True)
        s = (sqx / sq2).gather(1, best)
        out.append(torch.where(s.abs() < 1e-10, am, s))  # all-zero or zero-importance groups
    return torch.cat(out).reshape(n, k // group_size)


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


def dequantize_scales(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of double_quantize: the first `n` scales, float32."""
    return (q.view(scale.numel(), -1).float() * scale[:, None] + mean).reshape(-1)[:n]


def search_double_quantized(w: torch.Tensor, group_size: int, importance: torch.Tensor,
                            q: torch.Tensor, dq_scale: torch.Tensor, mean: torch.Tensor,
                            groups_per_chunk: int = 32768) -> torch.Tensor:
    """Returns int8 scale codes like `q` where each group's code is the one among `q`'s
    neighbours (DQ_NEIGHBOURS) whose stored scale gives the least weighted error: the search
    sees the 8-bit scale it will get, and the NF4 codes are then chosen for that scale."""
    n, k = w.shape
    wg = w.float().reshape(-1, group_size)
    imp = _group_importance(importance.to(w.device), n, group_size)
    step = dq_scale.repeat_interleave(q.numel() // dq_scale.numel())[:wg.shape[0]]
    deltas = torch.tensor(DQ_NEIGHBOURS, device=w.device, dtype=torch.float32)
    codes = (q[:wg.shape[0]].float()[:, None] + deltas).clamp(-127, 127)  # [B, D]
    out = []
    for wc, ic, cc, st in zip(wg.split(groups_per_chunk), imp.split(groups_per_chunk),
                              codes.split(groups_per_chunk), step.split(groups_per_chunk)):
        s = cc * st[:, None] + mean
        s = torch.where(s.abs() < 1e-10, torch.full_like(s, 1e-10), s)
        out.append(cc.gather(1, _weighted_err(wc, ic, s).argmin(-1, keepdim=True))[:, 0])
    best = q.clone()
    best[:wg.shape[0]] = torch.cat(out).to(torch.int8)
    return best


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
        w = linear.weight.detach()
        # `absmax` keeps QLoRA's name; with calibration it is the searched (possibly negative) scale.
        absmax = search_scales(w, group_size, importance)
        if double_quant:
            q, scale, mean = double_quantize(absmax, dq_block)
            if importance is not None:
                q = search_double_quantized(w, group_size, importance, q, scale, mean)
            absmax = dequantize_scales(q, scale, mean, absmax.numel()).reshape(absmax.shape)
            self.dq_block = dq_block
            self.register_buffer("absmax_q", q.to(dev))
            self.register_buffer("absmax_scale", scale.to(dev))
            self.register_buffer("absmax_mean", mean.to(dev))
        else:
            self.register_buffer("absmax", absmax.reshape(-1).to(dev))
        # codes for the scale as stored (after double quantization, if any)
        codes = _codes(w.float().reshape(n, -1, group_size), absmax[..., None]).reshape(n, k).to(torch.uint8)
        self.register_buffer("qweight", (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous())
        self._tables: dict[tuple, torch.Tensor] = {}

    def _absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        n = self.out_features * (self.in_features // self.group_size)
        return dequantize_scales(self.absmax_q, self.absmax_scale, self.absmax_mean, n)

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

    def _candidates(self, x: torch.Tensor) -> dict:
        cands = {"dequant_native": lambda x: F.linear(x, self._dequant_weight(x.dtype))}
        if x.dtype == torch.float32:
            cands["dequant_bf16"] = lambda x: F.linear(x.to(torch.bfloat16), self._dequant_weight(torch.bfloat16))
        return cands

    def _choice_key(self, x: torch.Tensor, bucket: int) -> tuple:
        return ("nf4", x.device.type, dtype_key(x), self.out_features, self.in_features, self.group_size, bucket)
