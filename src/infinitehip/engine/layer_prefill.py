"""Prefill into an offloaded cache layer by layer: every chunk of the prompt through layer 0, then
every chunk through layer 1, and so on.

Chunk by chunk (``generate.prefill``), each chunk's attention in each layer needs that layer's
keys so far, which live in host memory: read over PCIe for every chunk, the prompt's prefill
moves (chunks x layers x keys) bytes, quadratic in its length (a device copy per chunk and layer,
``attention/paged.py``: by arithmetic ~270 GB at 256K tokens of the 8B shape, ~4 TB at 1M; not
timed). Layer by layer, the one layer being prefilled keeps its pages in device memory as they
are written (``OffloadKVCache.hold``), so each key crosses PCIe twice in all (written, then
mirrored back), and the hidden states of the whole prompt (T x dim) wait in device memory between
layers. Measured on an H200 (docs/offload.md, "Layer by layer"): 256K tokens of the 8B shape in
16.7 s against 21.2 s chunk by chunk; 1M tokens (FP8 host store) in 142 s at 29.4 GiB of GPU memory.

The same kernels see the same values in the same order per chunk, so the logits are bit for bit
those of chunk-by-chunk prefill (tested). Used by ``prefill`` when the whole prompt is given,
the cache is offloaded, and the hidden states and one layer's K/V fit in free device memory.
"""
from __future__ import annotations

import torch

from ..cache.offload_kv import OffloadKVCache
from ..models import AttentionCall, Model, gemv


def fits(model: Model, cache, tokens: int) -> bool:
    """Whether the prompt's hidden states and one layer's K/V of the cache's rows fit in half the
    device memory free now (the other half for the chunks' activations); always on the CPU."""
    if not isinstance(cache, OffloadKVCache):
        return False
    if model.device.type != "cuda":
        return True
    a = model.args
    hidden = tokens * a.dim * model.dtype.itemsize
    layer = 2 * cache.batch * cache.capacity * a.n_kv_heads * a.head_dim * cache.stores[0].dk.element_size()
    return hidden + layer < 0.5 * torch.cuda.mem_get_info(model.device)[0]


@torch.inference_mode()
def prefill_by_layer(model: Model, tokens: torch.Tensor, cache: OffloadKVCache, call: AttentionCall, *,
                     chunk_size: int, start: int, bar=None) -> torch.Tensor:
    """``prefill``'s chunks of ``tokens`` (1, T) from ``start``, layer by layer; the last token's
    logits (1, V)."""
    net, T = model.net, tokens.shape[1]
    bounds = [(s, min(s + chunk_size, T)) for s in range(start, T, chunk_size)]
    steps = [net.step(e - s, torch.tensor([s], device=tokens.device), cache, call.backend, e) for s, e in bounds]
    x = net.tok_embeddings(tokens[:, start:])                                  # (1, T - start, C)
    configs, done = net.configs(call), 0                   # done: tokens x layers, for the progress bar
    try:
        for layer, block in enumerate(net.layers):
            cache.hold(layer, filled=start)
            for (s, e), step in zip(bounds, steps):
                x[:, s - start:e - start] = block(x[:, s - start:e - start], step, cache, configs[layer], call)
                if bar is not None:   # the bar counts tokens: a layer's chunk is 1/L of its tokens
                    bar.update((done + e - s) // len(net.layers) - done // len(net.layers))
                done += e - s
    finally:
        cache.hold(None)
    return gemv.linear(x[:, -1:], net.output.weight, norm=net.norm.args).float()[:, -1]
