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
the cache is offloaded, and the hidden states and one layer's K/V fit in free device memory; and
by the batch runner, which advances a ``LayerPrefill`` a chunk's worth of work per step between
decode steps, as it prefills chunk by chunk (chunk by chunk, a million-token prompt into an
offloaded server slot would move ~4 TB over PCIe).
"""
from __future__ import annotations

import logging

import torch

from ..cache.offload_kv import OffloadKVCache
from ..models import AttentionCall, Model, gemv

log = logging.getLogger("infinitehip.engine")


def held_bytes(args, dtype: torch.dtype, kv_itemsize: int, tokens: int, kv_tokens: int) -> int:
    """Hidden states of ``tokens`` prompt tokens plus one layer's K/V of ``kv_tokens`` slots
    (``device_bytes``; ``infinitehip info`` asks it per token)."""
    return tokens * args.dim * dtype.itemsize + 2 * kv_tokens * args.n_kv_heads * args.head_dim * kv_itemsize


def device_bytes(model: Model, cache: OffloadKVCache, tokens: int) -> int:
    """What layer by layer keeps in device memory: the prompt's hidden states and one layer's
    K/V of the cache's rows (~10 KB a token at the 8B shape with an FP8 store)."""
    return held_bytes(model.args, model.dtype, cache.stores[0].dk.element_size(), tokens, cache.batch * cache.capacity)


def fits(model: Model, cache, tokens: int) -> bool:
    """Whether ``device_bytes`` fit in half the device memory free now (the other half for the
    chunks' activations); always on the CPU."""
    if not isinstance(cache, OffloadKVCache):
        return False
    if model.device.type != "cuda":
        return True
    return device_bytes(model, cache, tokens) < 0.5 * torch.cuda.mem_get_info(model.device)[0]


def begin(model: Model, tokens: torch.Tensor, cache, call: AttentionCall, *, chunk_size: int,
          start: int) -> "LayerPrefill | None":
    """A ``LayerPrefill`` of ``tokens`` (1, T) from ``start`` where layer by layer applies (an
    offloaded cache, more than one chunk to run, room for it: ``fits``); else None."""
    T = tokens.shape[1]
    if T - start <= chunk_size:
        return None
    if not fits(model, cache, T - start):
        if isinstance(cache, OffloadKVCache):   # said, since chunk by chunk is quadratic in the prompt
            log.warning("prefilling %s offloaded tokens chunk by chunk, not layer by layer: its hidden states and "
                        "one layer's K/V (%.1f GiB) need half the free device memory. Each chunk then reads the "
                        "layer's keys so far over PCIe (hours at a million tokens): free device memory, or "
                        "shorten the prompt", f"{T - start:,}", device_bytes(model, cache, T - start) / 2**30)
        return None
    return LayerPrefill(model, tokens, cache, call, chunk_size=chunk_size, start=start)


class LayerPrefill:
    """The (layer, chunk) units of a prompt's prefill, layer-major, run a budget at a time.

    ``run(budget)`` runs units until ``budget`` prompt tokens' worth of work is done (a unit of
    n tokens in one of L layers is worth n / L; the unit that crosses the budget runs whole;
    None: to the end). Once the last unit has run, ``logits`` holds the last token's (1, V).
    The layer being prefilled is held in device memory (``OffloadKVCache.hold``) between calls,
    and the hidden states of the prompt (T - start, dim) are kept here: ``close()`` (or dropping
    the object) frees them.
    """

    @torch.inference_mode()
    def __init__(self, model: Model, tokens: torch.Tensor, cache: OffloadKVCache, call: AttentionCall, *,
                 chunk_size: int, start: int):
        self.model, self.cache, self.call, self.start = model, cache, call, start
        T = tokens.shape[1]
        self.bounds = [(s, min(s + chunk_size, T)) for s in range(start, T, chunk_size)]
        self.x = model.net.tok_embeddings(tokens[:, start:])                   # (1, T - start, C)
        self.configs = model.net.configs(call)
        self.layer, self.chunk = 0, 0                                           # the next unit
        self.logits: torch.Tensor | None = None
        self._work = 0                                     # token-layers run, for whole tokens' worth

    @torch.inference_mode()
    def run(self, budget: int | None = None, bar=None) -> int:
        """Run units for about ``budget`` prompt tokens' worth (None: all left); returns the whole
        tokens' worth run (at least 1 where a unit ran). ``bar`` counts tokens likewise."""
        net, L = self.model.net, len(self.model.net.layers)
        done0, spent = self._work // L, 0
        while self.logits is None and (budget is None or spent < budget * L):
            s, e = self.bounds[self.chunk]
            if self.chunk == 0:
                self.cache.hold(self.layer, filled=self.start)
            # The pass's state is made per unit (not once per chunk for all layers): a dense
            # backend's RoPE tables for every chunk of a million tokens would take ~1 GB.
            step = net.step(e - s, torch.tensor([s], device=self.x.device), self.cache, self.call.backend, e)
            xs = self.x[:, s - self.start:e - self.start]
            self.x[:, s - self.start:e - self.start] = net.layers[self.layer](xs, step, self.cache,
                                                                               self.configs[self.layer], self.call)
            spent += e - s
            before, self._work = self._work // L, self._work + e - s
            if bar is not None:
                bar.update(self._work // L - before)
            self.chunk += 1
            if self.chunk == len(self.bounds):
                self.layer, self.chunk = self.layer + 1, 0
                if self.layer == L:
                    last = self.x[:, -1:].clone()   # close() lets go of the rest first
                    self.close()
                    self.logits = gemv.linear(last, net.output.weight, norm=net.norm.args).float()[:, -1]
        return max(self._work // L - done0, 1 if spent else 0)

    def close(self):
        """Let go of the held layer and the hidden states (the run is over, or abandoned)."""
        if self.cache is not None:
            self.cache.hold(None)
            self.cache = None
        self.x = None   # else a failed run's traceback kept them (T x dim on the device)
