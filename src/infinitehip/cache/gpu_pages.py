"""A GPU page cache whose bookkeeping is tensor ops on the GPU: capturable in a CUDA graph.

``offload.BlockCache`` decides on the host which pages to fetch and evict (a host sync per layer
per step), so a decode step using it cannot be captured. ``GpuBlockCache`` keeps the same LRU
policy in device tensors with static shapes:

- ``slot_of`` (pages + 1,) int32: global page -> slot, -1 = absent. Viewed as (rows, NB) it is
  the block table the attention kernels read (no separate table to rebuild each step);
- ``owner`` (slots + 1,): slot -> global page or -1; ``stamp`` (slots + 1,): the step that last
  used the slot (-1 = free, older than any step); ``step``: a counter advanced per ``fetch``;
- one extra *scratch* slot (and table entry) that masked-off writes go to, so every scatter has
  a static shape; nothing ever reads it (victims are taken from the real slots only).

``fetch`` dedupes by sorting (``unique`` would sync and give a data-dependent shape), restamps
hits, gives the misses the oldest-stamped slots (``topk`` with k = the needed width), clears the
evicted pages' table entries and copies the missed pages in with one masked kernel: only misses
cross PCIe. Pages stamped this step are never victims, so the sink and window (needed every
step) stay resident. Writes to the store must go through ``write_tokens`` / ``write_pages``
(decode: keeps the slot coherent, static shapes) or ``invalidate`` (prefill).

Legend: M needed entries, N written pages, K kv heads, D head dim.
"""
from __future__ import annotations

import torch

from .offload import CacheStats, HostKVStore


class GpuBlockCache:
    """``n_slots`` device pages caching pages of one HostKVStore, LRU, sync-free bookkeeping."""

    def __init__(self, store: HostKVStore, n_slots: int, device=None):
        num_pages, page, K, D = store.k.shape
        self.store, self.n_slots, self.num_pages, self.page = store, n_slots, num_pages, page
        self.scratch = n_slots                                                   # the extra slot
        # Decoded pages in the model dtype (like BlockCache: the kernels read a table or FP8
        # scales, not both); zeros: masked reads stay finite.
        self.k = torch.zeros(n_slots + 1, page, K, D, dtype=store.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_of = torch.full((num_pages + 1,), -1, dtype=torch.int32, device=device)
        self.owner = torch.full((n_slots + 1,), -1, dtype=torch.long, device=device)
        self.stamp = torch.full((n_slots + 1,), -1, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.counts = torch.zeros(3, dtype=torch.long, device=device)            # hits, misses, evictions

    @property
    def nbytes(self) -> int:
        """Device bytes: pools, table, per-slot bookkeeping."""
        return sum(t.nbytes for t in (self.k, self.v, self.slot_of, self.owner, self.stamp))

    @property
    def stats(self) -> CacheStats:
        """Totals so far (reads the device counters: one host sync; not for the decode loop)."""
        hits, misses, evictions = self.counts.tolist()
        return CacheStats(hits, misses, evictions)

    def table(self, nb: int) -> torch.Tensor:
        """The block table of every row of the store: (rows, NB) int32 view of ``slot_of``."""
        return self.slot_of[:self.num_pages].view(-1, nb)

    def fetch(self, pages: torch.Tensor) -> torch.Tensor:
        """Slots (shape of ``pages``, -1 where the page is -1) holding the needed global pages."""
        flat = pages.reshape(-1).to(self.slot_of.device, torch.long)            # (M,)
        m = flat.numel()
        if m > self.n_slots:     # static: the width, not the distinct count (that would need a sync)
            raise ValueError(f"{m} pages may be needed at once but the GPU page cache has {self.n_slots} slots; "
                             "give it more (OffloadConfig.gpu_pages or headroom)")
        self.step += 1
        ids = flat.sort().values
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]                                          # one entry per distinct page
        want = first & (ids >= 0)
        slot = self.slot_of[ids.clamp(min=0)].long()
        hit, miss = want & (slot >= 0), want & (slot < 0)
        self.stamp[torch.where(hit, slot, self.scratch)] = self.step            # before choosing victims
        dst = torch.where(miss, self._victims(miss, m), self.scratch)           # (M,)
        evicted = self.owner[dst]
        gone = miss & (evicted >= 0)
        self.slot_of[torch.where(gone, evicted, self.num_pages)] = -1
        self.owner[dst] = torch.where(miss, ids, -1)
        self.stamp[dst] = self.step
        self.slot_of[torch.where(miss, ids, self.num_pages)] = dst.int()
        copy_pages(self.store, self.k, self.v, ids.clamp(min=0), dst, miss)
        self.counts += torch.stack([hit.sum(), miss.sum(), gone.sum()])
        slots = self.slot_of[flat.clamp(min=0)].long()
        return torch.where(flat >= 0, slots, -1).view(pages.shape)

    def _victims(self, miss: torch.Tensor, m: int) -> torch.Tensor:
        """The slot each miss takes (M,): the i-th miss the i-th oldest-stamped slot.

        This step's hits carry the newest stamp, and at least as many slots as misses are older
        (slots >= M >= hits + misses), so the first misses-many of the ascending top-k are free
        or least recently used slots, never a page this step reads.
        """
        rank = (miss.long().cumsum(0) - 1).clamp(min=0)
        oldest = self.stamp[:self.n_slots].topk(m, largest=False).indices        # (M,) oldest first
        return oldest[rank]

    def write_tokens(self, pages: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Copy tokens just written to the store into the resident copies of their pages:
        pages, offsets (N,), k, v (N, K, D). Static shapes: absent pages write the scratch slot."""
        row = self._resident(pages) * self.page + offsets
        self.k.view(-1, *self.k.shape[2:])[row] = k.to(self.k.dtype)
        self.v.view(-1, *self.v.shape[2:])[row] = v.to(self.v.dtype)

    def write_pages(self, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Replace the resident copies of whole pages (N,) by k, v (N, page, K, D) (decoded values)."""
        dst = self._resident(pages)
        self.k[dst], self.v[dst] = k.to(self.k.dtype), v.to(self.v.dtype)

    def invalidate(self, pages: torch.Tensor):
        """Forget the resident copies of ``pages`` (any shape; rewritten in the store by the caller)."""
        pages = pages.reshape(-1).to(self.slot_of.device, torch.long)
        dst = self._resident(pages)
        self.owner[dst], self.stamp[dst] = -1, -1
        self.slot_of[pages] = -1

    def _resident(self, pages: torch.Tensor) -> torch.Tensor:
        """The slot holding each of ``pages`` (N,), the scratch slot where a page is absent: a write
        through it has a static shape and lands nowhere anyone reads."""
        slot = self.slot_of[pages].long()
        return torch.where(slot >= 0, slot, self.scratch)


def copy_pages(store: HostKVStore, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
               do: torch.Tensor):
    """k[dst[i]], v[dst[i]] = the store's page src[i] (decoded) where do[i]; src, dst, do (M,).

    On CUDA one masked Triton kernel per pool: entries with do = False load nothing, so only the
    misses cross PCIe. Elsewhere (the host is the device) a torch gather of all M pages, with the
    masked-off ones going to dst's scratch slot (the caller points them there).
    """
    if k.device.type == "cuda":
        from ..attention.triton.page_copy import copy_pages_cuda   # triton: CUDA only
        copy_pages_cuda(store.dk, store.dk_scale if store.fp8 else None, k, src, dst, do)
        copy_pages_cuda(store.dv, store.dv_scale if store.fp8 else None, v, src, dst, do)
        return
    kp, vp = store.read(src, k.device)
    k[dst], v[dst] = kp, vp

