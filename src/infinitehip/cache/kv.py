"""The KV cache: un-rotated keys and values of every layer, fixed capacity per sequence.

Storage is cut into blocks of ``block_size`` tokens, ``(B, n_blocks, block_size, K, D)`` per
layer, so a block is the unit a later offload tier moves (full cache in pinned host memory, an
optional GPU page cache in front: ``offload_kv.py``). The model uses three calls: ``update`` writes new
K/V and returns views of the whole cache (or, for a decode step, ``write_target`` says where the
q/k/v projection writes them itself and ``views`` returns the views); ``attention`` is the
attention call that reads it; ``select`` narrows to some batch rows (prefill one prompt at a time).
Capacity is fixed at allocation, so decode shapes are static (CUDA-graph capturable).
"""
from __future__ import annotations

import functools
import os

import torch

from ..attention.api import cache_attention, cache_prune


class CapacityError(ValueError):
    """The request does not fit in memory; the message gives the numbers and what to change."""


# Tokens per storage block: the cache allocates whole blocks per row (``plan_kv_cache`` plans them).
BLOCK_SIZE = 256


class KVCache:
    def __init__(self, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str, block_size: int = BLOCK_SIZE):
        n_blocks = -(-capacity // block_size)
        shape = (batch, n_blocks, block_size, n_kv_heads, head_dim)
        # Zeros, not empty: attention masks unwritten slots, and 0 * NaN would still be NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.block_size, self.capacity = block_size, n_blocks * block_size

    @classmethod
    def _view(cls, k: list[torch.Tensor], v: list[torch.Tensor], block_size: int) -> "KVCache":
        self = cls.__new__(cls)
        self.k, self.v, self.block_size = k, v, block_size
        self.capacity = k[0].shape[1] * block_size
        return self

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def n_layers(self) -> int:
        return len(self.k)

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    def select(self, rows: slice) -> "KVCache":
        """A cache over batch rows ``rows`` that shares this one's storage."""
        return KVCache._view([t[rows] for t in self.k], [t[rows] for t in self.v], self.block_size)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.batch, self.capacity, *t.shape[3:])                  # (B, capacity, K, D)

    def _layers(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.k, self.v) for t in pair]                # k_0, v_0, k_1, ...

    def read_prefix(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row 0's first ``n`` keys and values (n, K, D), copied to host memory for the prefix
        cache: its entries live outside the memory plan (an 8B model's 128K-token document is
        16 GiB), so on a GPU they would take what the next request's cache was planned to use."""
        k, v = self._rows(self.k[layer]), self._rows(self.v[layer])
        return k[0, :n].to("cpu", copy=True), v[0, :n].to("cpu", copy=True)

    def copy_prefix(self, src: int, dst: int, n: int):
        """Batch row ``src``'s first ``n`` positions into row ``dst``, in every layer (on the device)."""
        for t in self._layers():
            self._rows(t)[dst, :n] = self._rows(t)[src, :n]

    def read_position(self, row: int, pos: int) -> list[torch.Tensor]:
        """Copies of every layer's K and V at ``(row, pos)``, (K, D) each, on the device."""
        return [self._rows(t)[row, pos].clone() for t in self._layers()]

    def write_position(self, row: int, pos: int, saved: list[torch.Tensor]):
        """Write what ``read_position`` read at ``(row, pos)``."""
        for t, x in zip(self._layers(), saved):
            self._rows(t)[row, pos] = x

    def attention(self, layer: int):
        """The sparse attention call over this cache: ``hip_attention``'s (the K/V ``update``
        returns are plain device tensors), trusting the lengths the engine keeps. ``fresh`` (a
        mask taking effect now) matters only to a cache that moves pages."""
        return lambda q, k, v, fresh=False, **kw: cache_attention(q, k, v, **kw)

    def prune(self, layer: int):
        """The pruning half of ``attention`` over the layer's first ``tk`` keys:
        ``prune(q, tk, **hip_attention keywords) -> HiPMask | None``."""
        return lambda q, tk, **kw: cache_prune(q, self.views(layer)[0][:, :tk], **kw)

    def plan_write(self, start: torch.Tensor, T: int) -> torch.Tensor | None:
        """Where ``update`` writes T tokens per row at ``start`` (B,): the flat cache rows (B * T,),
        the same for every layer, so a forward pass computes them once; None for one row's
        prefill (a contiguous slice, no index)."""
        B = start.shape[0]
        if B == 1 and T > 1:
            return None
        return (start[:, None] + _row_offsets(B, T, self.capacity, start.device)).flatten()

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values as (B, capacity, K, D) views."""
        ks, vs = self.k[layer], self.v[layer]
        return ks.view(self.batch, self.capacity, *ks.shape[3:]), vs.view(self.batch, self.capacity, *vs.shape[3:])

    def write_target(self, layer: int, plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Where a projection may write this pass's K/V itself (``gemv.Scatter``): the layer's K and
        V as (B * capacity, K * D) rows and ``plan``'s flat rows; None for a slice plan (one row's
        prefill), which ``update`` writes; None too for a subclass with its own ``update`` (it
        may store something other than what it is given)."""
        if plan is None or type(self).update is not KVCache.update:
            return None
        ks, vs = self.k[layer], self.v[layer]
        return ks.view(-1, ks.shape[3] * ks.shape[4]), vs.view(-1, vs.shape[3] * vs.shape[4]), plan

    def update(self, layer: int, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan=None):
        """Write k, v (B, T, K, D) at positions ``start[b] + t``; return (B, capacity, K, D) views.

        start: (B,) int64 on the cache's device; plan: ``plan_write(start, T)`` when the caller
        made it already. Positions must be < capacity (the engine plans capacity before prefill;
        an index past it is a bug, not a user error).
        """
        T = k.shape[1]
        kf, vf = self.views(layer)                                          # (B, capacity, K, D)
        flat = plan if plan is not None else self.plan_write(start, T)
        if flat is None:  # prefill of one row: one contiguous slice
            s = int(start[0])
            kf[0, s:s + T], vf[0, s:s + T] = k[0], v[0]
        elif k.is_cuda:   # decode: K and V rows in one launch (the index is made once per pass)
            from ..attention.triton.kv_write import write_rows   # triton: CUDA only here
            write_rows(kf.view(-1, *k.shape[2:]), vf.view(-1, *v.shape[2:]), flat, k.flatten(0, 1), v.flatten(0, 1))
        else:
            kf.view(-1, *k.shape[2:]).index_copy_(0, flat, k.flatten(0, 1))
            vf.view(-1, *v.shape[2:]).index_copy_(0, flat, v.flatten(0, 1))
        return kf, vf


@functools.lru_cache(maxsize=64)
def _row_offsets(B: int, T: int, capacity: int, device: torch.device) -> torch.Tensor:
    """(B, T) flat cache row of token t of batch row b, relative to its start: b * capacity + t."""
    return torch.arange(B, device=device)[:, None] * capacity + torch.arange(T, device=device)


def kv_bytes(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V per token, all layers."""
    return 2 * n_layers * n_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (GPU: free memory; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_kv_cache(*, n_layers: int, n_kv_heads: int, head_dim: int, batch: int, capacity: int,
                  dtype: torch.dtype, device: torch.device, workspace: int = 0,
                  free: int | None = None, block_size: int = BLOCK_SIZE) -> int:
    """Check, before allocating, that a cache of ``batch`` x ``capacity`` tokens fits; return its bytes.

    ``workspace`` is the extra memory the forward pass needs (activations of a prefill chunk).
    Capacity is rounded up to whole blocks, as ``KVCache`` allocates it (up to ``block_size - 1``
    tokens a row more than asked). Raises CapacityError with the numbers and the ways out.
    """
    per_token = kv_bytes(n_layers, n_kv_heads, head_dim, dtype)
    capacity = -(-capacity // block_size) * block_size
    need = per_token * batch * capacity
    free = free_memory(device) if free is None else free
    if need + workspace > free:
        fits = max(0, (free - workspace) // (per_token * batch)) // block_size * block_size
        gib = 1 << 30
        raise CapacityError(
            f"the KV cache for {batch} x {capacity:,} tokens needs {need / gib:.2f} GiB "
            f"(+{workspace / gib:.2f} GiB workspace) but only {free / gib:.2f} GiB are free on {device}; "
            f"at most ~{fits:,} tokens per sequence fit. Use a smaller dtype (bfloat16/float16), "
            "a shorter prompt or fewer new tokens, fewer prompts at once"
            + (", or KV offload to host memory (offload=True, --offload)." if device.type == "cuda" else
               " (on the CPU the cache already lives in host memory: offloading adds nothing)."))
    return need
