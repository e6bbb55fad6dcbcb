"""Context caching inside a batch runner's slots: a finished request's prompt KV stays where it was
prefilled, in its slot of the KV cache, until another request overwrites it.

A request whose prompt starts with a prompt some slot still holds (a second question about the
same document) starts from it: admitted into that very slot when it is free (nothing is copied),
else into another free slot with a device-to-device copy. Before, every long prompt's KV was
copied to host memory after its prefill, and every reuse copied it back: an 8B model's
70K-token prompt spent 5.2 s in that copy (H200, pageable host memory at ~1.8 GB/s) on the
worker thread, where every other request's decode waited, and a second question 1.4-4.9 s to
copy it back (``benchmarks/results/server_http_h200.json``). Slot prompts cost neither; they are kept as long as their slots are not needed for
other prompts (least recently released first), and ``PrefixCache`` entries (a ``--context-cache``
file) are taken where they hold a longer prefix.

Free slots ride along in decode steps writing a throwaway token at position 0 (``batch.py``), so
each slot prompt keeps its position-0 K and V aside, written back when the prompt is reused.
An offloaded cache (``OffloadKVCache``) holds its slots in host memory and does the same through
its store (the page of position 0 is saved whole: an FP8 write re-encodes it; copies between slots
go through the device alias, codes and scales as stored). As the
prefix cache's entries, a held prompt is reused only by prompts prefilled alike (densely, or past
the dense cutoff sparsely: ``prefix_cache.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..cache.kv import KVCache
from ..cache.offload_kv import OffloadKVCache
from .prefix_cache import PrefixCache, shared_prefix


@dataclass
class _Held:
    ids: torch.Tensor           # (T,) the prompt whose K/V occupy positions [0, T) of the slot
    first: list[torch.Tensor]   # every layer's K and V at position 0, as prefilled
    sparse: bool                # prefilled sparsely (``generate.sparse_prompt``)


class SlotPrompts:
    def __init__(self, cache: KVCache | OffloadKVCache, prefix_cache: PrefixCache,
                 sparse: Callable[[int], bool] = lambda n: False):
        self.cache, self.rules = cache, prefix_cache    # the prefix cache's block and minimum lengths
        self.sparse = sparse                            # whether an n-token prompt is prefilled sparsely
        self.held: list[_Held | None] = [None] * cache.batch
        self._released = [0] * cache.batch              # when each slot was last freed (LRU)
        self._clock = 0

    def __len__(self) -> int:
        return sum(h is not None for h in self.held)

    def longest(self, ids: list[int], free: list[int]) -> tuple[int, int | None]:
        """(n, slot): the longest prefix of ``ids`` a slot holds, in whole blocks of the prefix
        cache, leaving one token to prefill; of equal ones a free slot's (reused in place)."""
        query, best, where, sparse = torch.tensor(ids[:-1]), 0, None, self.sparse(len(ids))
        for slot, h in enumerate(self.held):
            if h is None or h.sparse != sparse:
                continue
            same = shared_prefix(h.ids, query, self.rules.block_tokens)
            if same > best or (same == best > 0 and slot in free and where not in free):
                best, where = same, slot
        return best, where

    def pick(self, ids: list[int], free: list[int], beat: int = 0) -> tuple[int, int | None, int]:
        """A free slot for prompt ``ids`` and the longest prefix a slot holds unless the prefix
        cache has more (``beat`` tokens; a tie copies nothing from host memory here): (slot, its
        source slot or None, tokens).
        Nothing is written: the caller makes the request the one prefilling first, so should
        ``fill`` fail, ``abort`` names it and forgets what its slot holds."""
        n, src = self.longest(ids, free)
        if n < beat:
            n, src = 0, None
        if src in free:
            slot = src
        else:   # an empty slot first, else the one freed longest ago
            slot = min(free, key=lambda s: (self.held[s] is not None, self._released[s]))
        return slot, src, n

    def fill(self, slot: int, src: int | None, n: int, ids: list[int]) -> int:
        """Put ``pick``'s prefix in ``slot``; returns the tokens reused."""
        if src is None:
            self.held[slot] = None
            return 0
        first = self.held[src].first
        if src != slot:
            self.cache.copy_prefix(src, slot, n)
        self.cache.write_position(slot, 0, first)     # free, the slot rode decode steps that wrote there
        self.held[slot] = _Held(torch.tensor(ids[:n]), first, self.sparse(len(ids)))   # until the rest is prefilled
        return n

    def prefilled(self, slot: int, ids: list[int]):
        """Slot ``slot`` now holds prompt ``ids`` whole: kept if at least the prefix cache's
        ``min_tokens`` long (as it would keep it)."""
        if len(ids) < self.rules.min_tokens:
            self.held[slot] = None
            return
        first = self.held[slot].first if self.held[slot] is not None else self.cache.read_position(slot, 0)
        self.held[slot] = _Held(torch.tensor(ids), first, self.sparse(len(ids)))

    def released(self, slot: int):
        self._clock += 1
        self._released[slot] = self._clock

    def drop(self, slot: int):
        """Forget what ``slot`` holds (its K/V may be half written)."""
        self.held[slot] = None

    def keep(self, prefix_cache: PrefixCache, owner: str):
        """Copy every held prompt into ``prefix_cache``'s host entries (to save them in a file)."""
        for slot, h in enumerate(self.held):
            if h is not None:
                self.cache.write_position(slot, 0, h.first)
                prefix_cache.store(h.ids.tolist(), self.cache.select(slice(slot, slot + 1)), owner, h.sparse)
