"""How the attention kernels find key/value rows when K/V are not one plain (B, Tk, K, D) tensor.

Two independent additions to a plain read, both used by KV offloading (``cache/offload_kv.py``):

- **Block table** (``table``): K/V are a pool of pages shared by every batch row, and logical
  position ``p`` of row ``b``, kv head ``h``, lives at pool row ``slot * page + p % page`` where
  ``slot = table[b, p // page, h]``. A table (B, NB, K) gives each kv head its own slot, into a
  pool ``(N, page, 1, D)`` of one-head pages: a GPU page cache then holds exactly the (page, head)
  pairs the per-head masks select (an all-heads page would bring 8x more bytes for Llama-3's 8
  kv heads). A table (B, NB) gives all heads one slot, into a pool ``(N, page, K, D)``. The
  offload path points the table at its GPU page cache after fetching what a mask selects.
  Entries of pages no valid key reads may hold anything; -1 (not resident) reads slot 0, in
  the reference and the kernel alike (a batch runner's parked row reads such pages).
- **FP8 scales** (``k_scale`` / ``v_scale``): K/V are float8_e4m3 codes in the plain logical
  layout and element ``[b, p, h, :]`` is ``code * scale[b, p // page, h]``. The offload path
  reads the host store this way, in place (zero-copy), in pruning and in prefill attention.
- **Probe copy** (``probes``, pruning only): every key at a position that is a multiple of
  ``probe_stride``, K only, in the store's format, in device memory: ``probes[b, p // stride, h]``
  is key ``[b, p, h]``. The pruning kernel reads those probes from it instead of over PCIe (the
  first pruning stage's first levels probe exactly there: ``cache/offload.py``).

A table and scales together are not supported (the GPU page cache holds decoded pages).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVPages:
    page: int                               # tokens per page (a power of two)
    table: torch.Tensor | None = None       # (B, NB) or (B, NB, K) int32: logical page (, kv head) -> pool page
    k_scale: torch.Tensor | None = None     # (B, NB, K) float32 FP8 scales of the keys
    v_scale: torch.Tensor | None = None     # (B, NB, K) float32 FP8 scales of the values
    probes: torch.Tensor | None = None      # (B, ceil(Tk / probe_stride), K, D): keys at multiples of the stride
    probe_stride: int = 0

    def __post_init__(self):
        if self.page < 1 or self.page & (self.page - 1):
            raise ValueError(f"page={self.page} must be a power of two")
        if self.table is not None and self.k_scale is not None:
            raise ValueError("a block table and FP8 scales together are not supported: decode pages into the pool")
        if (self.k_scale is None) != (self.v_scale is None):
            raise ValueError("give both k_scale and v_scale, or neither")
        if (self.probes is None) != (self.probe_stride == 0):
            raise ValueError("give probes together with a probe_stride > 0, or neither")
        if self.probe_stride & (self.probe_stride - 1):
            raise ValueError(f"probe_stride={self.probe_stride} must be a power of two")

    @property
    def scaled(self) -> bool:
        return self.k_scale is not None


def table_strides(table: torch.Tensor) -> tuple[int, int, int]:
    """(batch, page, kv head) strides of a block table; 0 on the heads of a (B, NB) table."""
    return table.stride(0), table.stride(1), table.stride(2) if table.dim() == 3 else 0


def gather_paged(pool: torch.Tensor, idx: torch.Tensor, groups: int, pages: KVPages) -> torch.Tensor:
    """Rows of the logical K or V at positions idx (B, G, ...) for the kv heads of each group,
    read from ``pool`` through ``pages.table``: (B, G, ..., K // G, D) float32. Positions are
    clamped to >= 0, rows of pages that are not resident to slot 0 (callers mask those keys)."""
    B, nb = idx.shape[0], pages.table.shape[1]
    N, page, pool_heads, D = pool.shape
    table = pages.table.long()
    K = table.shape[2] if table.dim() == 3 else pool_heads
    table = table if table.dim() == 3 else table[..., None]                     # (B, NB, K or 1)
    heads = torch.arange(K, device=pool.device).view(1, groups, 1, K // groups)  # (1, G, 1, KG)
    pos = idx.reshape(B, groups, -1, 1).clamp(min=0)                             # (B, G, n, 1)
    b = torch.arange(B, device=pool.device).view(B, 1, 1, 1)
    slot = table[b, (pos // page).clamp(max=nb - 1), heads if table.shape[2] == K else 0]   # (B, G, n, KG)
    rows = slot.clamp(min=0) * page + pos % page
    out = pool.reshape(N * page, pool_heads, D)[rows, heads if pool_heads == K else 0].float()
    return out.view(*idx.shape, K // groups, D)
