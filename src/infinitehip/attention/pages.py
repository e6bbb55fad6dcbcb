"""How the attention kernels find key/value rows when K/V are not one plain (B, Tk, K, D) tensor.

Two independent additions to a plain read, both used by KV offloading (``cache/offload_kv.py``):

- **Block table** (``table``): K/V are a pool of pages ``(N_pages, page, K, D)`` shared by every
  batch row, and logical position ``p`` of row ``b`` lives at pool row
  ``table[b, p // page] * page + p % page``. The offload path points the table at the GPU
  block cache after fetching the pages a mask selects. Entries of pages no valid key reads may
  hold anything (the kernels never load them).
- **FP8 scales** (``k_scale`` / ``v_scale``): K/V are float8_e4m3 codes in the plain logical
  layout and element ``[b, p, h, :]`` is ``code * scale[b, p // page, h]``. The offload path
  reads the host store this way, in place (zero-copy), in pruning and in prefill attention.

A table and scales together are not supported (the GPU block cache holds decoded pages).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVPages:
    page: int                               # tokens per page (a power of two)
    table: torch.Tensor | None = None       # (B, NB) int32: logical page -> pool page
    k_scale: torch.Tensor | None = None     # (B, NB, K) float32 FP8 scales of the keys
    v_scale: torch.Tensor | None = None     # (B, NB, K) float32 FP8 scales of the values

    def __post_init__(self):
        if self.page < 1 or self.page & (self.page - 1):
            raise ValueError(f"page={self.page} must be a power of two")
        if self.table is not None and self.k_scale is not None:
            raise ValueError("a block table and FP8 scales together are not supported: decode pages into the pool")
        if (self.k_scale is None) != (self.v_scale is None):
            raise ValueError("give both k_scale and v_scale, or neither")

    @property
    def scaled(self) -> bool:
        return self.k_scale is not None


def physical_rows(pages: KVPages, idx: torch.Tensor) -> torch.Tensor:
    """Pool rows of logical positions idx (B, ...) through the block table (rows of pages that
    are not resident come out clamped to 0; callers mask those keys)."""
    B = idx.shape[0]
    nb = pages.table.shape[1]
    flat = idx.reshape(B, -1).clamp(min=0)
    slot = pages.table.long().gather(1, (flat // pages.page).clamp(max=nb - 1))
    return (slot.clamp(min=0) * pages.page + flat % pages.page).view(idx.shape)
