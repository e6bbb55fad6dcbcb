"""The GPU page cache of offloaded decode: the (page, kv head) pairs the sparse masks select,
resident in device memory, with bookkeeping that is tensor ops on the device (no host sync, static
shapes: captured in CUDA graphs with the rest of the decode step).

The unit is one page of one kv head (``page`` tokens x D): each kv head's mask selects its own
chunks, so caching whole pages (all kv heads) would bring 8x the bytes for Llama-3's 8 kv heads.
Unit ``u`` of a store is page ``u // K``, head ``u % K``.

- ``k``, ``v`` (slots + 1, page, 1, D): the pools, decoded pages in the model dtype (the kernels
  read a table or FP8 scales, not both); zeros, so masked reads stay finite;
- ``slot_of`` (units + 1,) int32: unit -> slot, -1 = absent. Viewed as (rows, NB, K) it is the
  block table the attention kernels read (``attention/pages.py``), nothing rebuilt per step;
- ``owner`` (slots + 1,): slot -> unit or -1; ``stamp`` (slots + 1,): the step that last used
  the slot (-1 = free, older than any step); ``step``: a counter advanced per ``fetch``;
- one extra *scratch* slot (and table entry) that masked-off writes go to, so every scatter has
  a static shape; nothing ever reads it (victims are taken from the real slots only).

``fetch`` = a plan (``plan_fetch``; on CUDA the same plan in one Triton launch,
``page_cache.plan_fetch_cuda``: bookkeeping of a few thousand entries is launch-bound, and the
PyTorch form takes ~30 small kernels) — dedupe, restamp the hits, give the misses the least
recently used slots, clear the evicted units' table entries — then one masked copy of the missed
units: only misses cross PCIe. Units stamped this step are never victims, so the sink and window
(needed every step) stay resident. Writes to the store must go through ``write_tokens`` /
``write_pages`` (decode: keeps resident units coherent, static shapes) or ``invalidate`` (prefill).

Legend: M needed entries, N written pages, K kv heads, D head dim.
"""
from __future__ import annotations

import torch

from .offload import CacheStats, HostKVStore


class PageCache:
    """``n_slots`` device units (one page of one kv head) caching a HostKVStore, LRU."""

    def __init__(self, store: HostKVStore, n_slots: int, device=None):
        num_pages, page, K, D = store.k.shape
        self.store, self.n_slots, self.page, self.heads = store, n_slots, page, K
        self.num_units = num_pages * K
        self.scratch = n_slots                                                   # the extra slot
        self.k = torch.zeros(n_slots + 1, page, 1, D, dtype=store.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_of = torch.full((self.num_units + 1,), -1, dtype=torch.int32, device=device)
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
        """Totals so far, in units (reads the device counters: one host sync; not for the decode loop)."""
        hits, misses, evictions = self.counts.tolist()
        return CacheStats(hits, misses, evictions)

    def units(self, pages: torch.Tensor) -> torch.Tensor:
        """Every kv head's unit of ``pages`` (...,): (..., K)."""
        return pages[..., None] * self.heads + torch.arange(self.heads, device=pages.device)

    def table(self, nb: int) -> torch.Tensor:
        """The block table of every row of the store: (rows, NB, K) int32 view of ``slot_of``."""
        return self.slot_of[:self.num_units].view(-1, nb, self.heads)

    def fetch(self, units: torch.Tensor):
        """Make the needed ``units`` (any shape, -1 = none) resident; ``slots`` then finds them."""
        flat = units.reshape(-1).to(self.slot_of.device, torch.long)            # (M,)
        if flat.numel() > self.n_slots:  # static: the width, not the distinct count (that would need a sync)
            raise ValueError(f"{flat.numel()} pages of a kv head may be needed at once but the GPU page cache has "
                             f"{self.n_slots} slots; give it more (OffloadConfig.gpu_pages or headroom)")
        if self.k.device.type == "cuda":       # the same plan in one launch (Triton: CUDA only)
            from ..attention.triton.page_cache import plan_fetch_cuda as plan
        else:
            plan = plan_fetch
        copy_units(self.store, self.k, self.v, *plan(self, flat))

    def slots(self, units: torch.Tensor) -> torch.Tensor:
        """The slot of each of ``units`` (any shape), -1 where absent or where the unit is -1."""
        return torch.where(units >= 0, self.slot_of[units.clamp(min=0)].long(), -1)

    def write_tokens(self, pages: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Copy tokens just written to the store into the resident copies of their units:
        pages, offsets (N,), k, v (N, K, D). Static shapes: absent units write the scratch slot."""
        row = (self._resident(self.units(pages)) * self.page + offsets[:, None]).flatten()   # (N * K,)
        self.k.view(-1, self.k.shape[-1])[row] = k.flatten(0, 1).to(self.k.dtype)
        self.v.view(-1, self.v.shape[-1])[row] = v.flatten(0, 1).to(self.v.dtype)

    def write_pages(self, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Replace the resident copies of whole pages (N,) by k, v (N, page, K, D) (decoded values)."""
        dst = self._resident(self.units(pages))                                  # (N, K)
        self.k[dst] = k.transpose(1, 2)[:, :, :, None].to(self.k.dtype)         # (N, K, page, 1, D)
        self.v[dst] = v.transpose(1, 2)[:, :, :, None].to(self.v.dtype)

    def invalidate(self, pages: torch.Tensor):
        """Forget the resident copies of ``pages`` (any shape; rewritten in the store by the caller)."""
        units = self.units(pages.reshape(-1).to(self.slot_of.device, torch.long)).flatten()
        dst = self._resident(units)
        self.owner[dst], self.stamp[dst] = -1, -1
        self.slot_of[units] = -1

    def _resident(self, units: torch.Tensor) -> torch.Tensor:
        """The slot holding each of ``units`` (any shape), the scratch slot where a unit is absent:
        a write through it has a static shape and lands nowhere anyone reads."""
        slot = self.slot_of[units].long()
        return torch.where(slot >= 0, slot, self.scratch)


def copy_units(store: HostKVStore, k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
               n: torch.Tensor):
    """k[dst[i]], v[dst[i]] = the store's unit src[i] (decoded) for i < n[0]: a plan's copies.

    On CUDA one Triton kernel for both pools: programs past n load nothing, so only the misses
    cross PCIe. Elsewhere (the host is the device) a torch gather of all M units, the entries
    past n going to the scratch slot (the pools' last).
    """
    if k.device.type == "cuda":
        from ..attention.triton.page_cache import copy_units_cuda   # triton: CUDA only
        scales = (store.dk_scale, store.dv_scale) if store.fp8 else (None, None)
        copy_units_cuda(store.dk, scales[0], store.dv, scales[1], k, v, src, dst, n)
        return
    live = torch.arange(src.numel(), device=src.device) < n                    # static shapes, no sync
    src, dst = torch.where(live, src, 0).clamp(min=0), torch.where(live, dst, k.shape[0] - 1)
    K = store.k.shape[2]
    kp, vp = store.read(src // K, k.device)                                     # (M, page, K, D)
    head = (src % K).to(k.device)[:, None, None, None].expand(-1, kp.shape[1], 1, kp.shape[3])
    k[dst], v[dst] = kp.gather(2, head), vp.gather(2, head)


def plan_fetch(cache: PageCache, flat: torch.Tensor):
    """The bookkeeping of ``cache.fetch(flat)`` (M,): update the cache's state for this step and
    return its copies (src (M,) store units, dst (M,) slots, n (1,)): the first n entries are the
    misses in entry order (src -> dst); the rest mean nothing.

    The PyTorch statement of the policy, for any device; ``page_cache.plan_fetch_cuda`` is the
    same in one Triton launch, state for state (tested):

    - each distinct unit counts at its first entry; a resident one is a hit and is restamped
      first, so this step's units are never victims;
    - the misses take the slots of smallest (stamp, slot index): free slots (stamp -1) first,
      then the least recently used; the r-th miss in entry order takes the r-th of those slots
      in slot order, and the units they held leave the table.
    """
    M, S, dev = flat.numel(), cache.n_slots, flat.device
    cache.step += 1
    order = flat.sort(stable=True).indices                                   # equal units in entry order
    head = torch.ones(M, dtype=torch.bool, device=dev)
    head[1:] = flat[order[1:]] != flat[order[:-1]]
    first = torch.zeros_like(head).scatter_(0, order, head)                  # (M,) in entry order
    unit = flat.clamp(min=0)
    slot = cache.slot_of[unit].long()
    want = first & (flat >= 0)
    hit, miss = want & (slot >= 0), want & (slot < 0)
    cache.stamp[torch.where(hit, slot, cache.scratch)] = cache.step
    # Victims: the n_miss smallest keys (stamp, index); at least n_miss slots are older than this step.
    n_miss = miss.sum()
    key = cache.stamp[:S] * S + torch.arange(S, device=dev)                  # (S,) ordered like (stamp, index)
    kth = key.sort().values.gather(0, (n_miss - 1).clamp(min=0).view(1))
    victim = (key <= kth) & (n_miss > 0)                                     # (S,) n_miss of them
    by_rank = torch.zeros(M + 1, dtype=torch.long, device=dev)               # [r] = the r-th victim slot
    by_rank.scatter_(0, torch.where(victim, victim.cumsum(0) - 1, M), torch.arange(S, device=dev))
    miss_rank = miss.cumsum(0) - 1                                           # (M,) the r of the r-th miss
    dst = torch.where(miss, by_rank[miss_rank.clamp(min=0)], cache.scratch)
    evicted = cache.owner[dst]
    gone = miss & (evicted >= 0)
    cache.slot_of.index_fill_(0, torch.where(gone, evicted, cache.num_units), -1)   # a scalar fill: capturable
    cache.owner[dst] = torch.where(miss, flat, -1)
    cache.stamp[dst] = cache.step
    cache.slot_of[torch.where(miss, flat, cache.num_units)] = dst.int()
    cache.counts += torch.stack([hit.sum(), n_miss, gone.sum()])
    rank = torch.where(miss, miss_rank, M)                                    # the copies, compact
    src = torch.full((M + 1,), -1, dtype=torch.long, device=dev).scatter_(0, rank, flat)[:M]
    return src, dst.new_empty(M + 1).scatter_(0, rank, dst)[:M], n_miss.view(1)
