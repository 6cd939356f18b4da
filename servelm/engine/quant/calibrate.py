"""Activation statistics from calibration text, for quantizers that weigh their error by them.

`input_importance` runs token windows through the model and returns, for every target Linear,
the mean square of each input feature over all calibration tokens (llama.cpp's "importance
matrix", the diagonal of the layer's Hessian x^T x). A weight error on an input that carries large
activations moves the output more, so NF4's block-scale search minimises sum_j imp_j (w_j - q_j)^2
instead of the plain squared error. The calibration text must not be the evaluation text.
"""
from __future__ import annotations

import torch
from torch import nn


def calibration_windows(tokenizer, path: str, ctx: int = 512, windows: int = 4) -> list[torch.Tensor]:
    """Returns up to `windows` token windows of `ctx` tokens spread over the text file at `path`.
    Raises ValueError for a file that is missing, unreadable or too short to calibrate on."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"quantization calibration text {path!r} cannot be read: {e}") from None
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    if ids.numel() < 64:
        raise ValueError(f"quantization calibration text {path!r} has {ids.numel()} tokens; give at least 64")
    total = max(1, ids.numel() // ctx)  # whole windows in the text (one, maybe short, if fewer)
    n = min(windows, total)
    return [ids[(i * total // n) * ctx:(i * total // n) * ctx + ctx] for i in range(n)]


def prefill_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Returns the final hidden states of one sequence `ids` [n], run as a single prefill through
    the engine's attention backend on a throw-away paged KV cache."""
    from servelm.engine.attention import BatchLayout, get_backend

    cfg, dev, n, bs = model.config, ids.device, ids.numel(), 16
    nblocks = -(-n // bs)
    backend = get_backend("auto", dev)
    kv = backend.allocate_kv_cache(cfg.num_layers, nblocks, bs, cfg.num_kv_heads, cfg.head_dim,
                                   model.embed_tokens.weight.dtype, dev)
    layout = BatchLayout(slot_mapping=torch.arange(n, device=dev), query_lens=[n], context_lens=[n],
                         block_tables=torch.arange(nblocks, dtype=torch.int32, device=dev)[None], num_prefills=1,
                         num_prefill_tokens=n, context_lens_tensor=torch.tensor([n], dtype=torch.int32, device=dev))
    return model(ids, torch.arange(n, device=dev), backend.make_context(layout, kv, cfg.head_dim ** -0.5))


@torch.inference_mode()
def input_importance(model: nn.Module, targets: list[tuple[str, nn.Linear]],
                     windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns {layer name: float32 [in_features] mean of x_j^2} over every token of `windows`
    (1-D token-id tensors), measured on the model as it is (before any layer is replaced)."""
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)
            for name, lin in targets}
    count = [0]

    def hook(name):
        def fn(mod, inputs, out):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] += (x * x).sum(0)
        return fn

    handles = [lin.register_forward_hook(hook(name)) for name, lin in targets]
    try:
        dev = next(model.parameters()).device
        for ids in windows:
            prefill_hidden(model, ids.to(dev))
            count[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return {name: s / max(count[0], 1) for name, s in sums.items()}
