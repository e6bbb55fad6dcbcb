"""The offloaded KV cache the engine uses: every layer's K/V in host memory.

Same interface as ``KVCache`` (``update``, ``select``, ``batch``, ``capacity``), plus
``attention(layer)``, which the model calls instead of ``hip_attention``:

- **writes** (prefill chunks, decode tokens) go straight to the host store through its device
  alias (zero-copy: the GPU writes mapped host memory); a decode token also rewrites the page
  cache's resident copies (one launch on CUDA, ``triton/kv_write.py``) and a prefill chunk drops
  them, so nothing is ever served stale;
- **pruning** reads keys from the host store in place (only the probed rows cross PCIe);
- **prefill attention** reads a device copy of the layer (``attention/paged.py``: one copy per
  chunk and layer), or, prefilling layer by layer (``hold``, ``engine/layer_prefill.py``), the
  layer's pages kept in device memory as they are written: each crosses PCIe twice in all;
- **decode attention** reads through a GPU page cache (``gpu_pages.PageCache``; the default,
  ``OffloadConfig.decode_cache``; False reads in place like prefill): after the
  mask of a step is known, the (page, kv head) units it selects plus the sink and the window are
  fetched (misses only: least recently used units are evicted; masks change only at refreshes,
  so the working set moves slowly) and attention reads them through the cache's block table.
  The bookkeeping is tensor ops on the device: no host sync, captured in CUDA graphs.

``OffloadConfig.gpu_layers`` layers keep their whole store in GPU memory instead (same format,
placed by ``offload_plan.plan_offload``): everything reads it in place, like the on-device
cache, so they have no page cache, and the context can use host + spare GPU memory.

Pages are ``page`` tokens of every kv head of one row: the unit of the host store and of the
FP8 scales; the page cache holds one kv head of a page. Legend: B batch, T tokens, K kv heads,
D head dim, NB pages per row.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..attention.mask import SENTINEL, lookahead, window_slots
from ..attention.pages import KVPages
from ..attention.paged import paged_hip_attention, paged_prune
from ..config import HiPConfig
from .gpu_pages import PageCache
from .offload import HostKVStore, fp8_decode
from .offload_plan import OffloadConfig, cache_slots, gpu_layer_order, plan_offload

# Calls with at most this many queries (decode) attend through the GPU page cache.
DECODE_QUERIES = 16


def needed_units(starts: torch.Tensor, geo, config: HiPConfig, page: int, K: int, row0: int = 0,
                 nb: int | None = None) -> torch.Tensor:
    """What the attention of mask ``starts`` (B, G, NQB, NSEL) reads until the next refresh, as
    the store's global (page, kv head) units ``((row0 + b) * nb + page) * K + head``: (B, M)
    int64, -1 = none (also pages past a row's ``nb``; ``nb`` None: no limit, row0 ignored: units
    within the row).

    Every head's sink pages, window pages (from each query block's window start to its last
    query, and on to the tokens the steps that reuse this mask will add: ``lookahead``) and each
    group's selected chunks for the heads of the group, in that order. Units nothing valid reads
    may be included; none is missed. ``page_cache.needed_units_cuda`` is the same in one launch.
    """
    B, G = starts.shape[:2]
    dev = starts.device
    heads = torch.arange(K, device=dev)
    sink = torch.arange(-(-config.sink // page), device=dev)[:, None] * K + heads            # (ns, K)
    wst = geo.w0.clamp(min=config.sink)                                                      # (B, NQB)
    last = geo.q_pos.masked_fill(~geo.q_valid, -1).amax(-1)                                  # (B, NQB)
    last_page = torch.where(last >= 0, (last + lookahead(config)) // page, -1)
    win = wst[..., None] // page + torch.arange(-(-window_slots(config) // page) + 1, device=dev)
    win = torch.where(win <= last_page[..., None], win, -1)[..., None]                       # (B, NQB, nw, 1)
    st = starts.long()
    sel = st[..., None] // page + torch.arange(max(1, config.chunk_size // page), device=dev)
    sel = torch.where((st != SENTINEL)[..., None], sel, -1)[..., None]                       # (B, G, NQB, NSEL, per, 1)
    group_heads = heads.view(G, 1, 1, 1, K // G)                                             # a group's kv heads
    units = torch.cat([sink.flatten().expand(B, -1),
                       torch.where(win >= 0, win * K + heads, -1).flatten(1),
                       torch.where(sel >= 0, sel * K + group_heads, -1).flatten(1)], dim=1)  # (B, M), within the row
    if nb is None:
        return units
    row = row0 + torch.arange(B, device=dev)[:, None]
    return torch.where((units >= 0) & (units < nb * K), row * nb * K + units, -1)


def touched_pages(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks (B, T): each written token's global page -> (the distinct pages (N,) ascending,
    each token's index in them (B * T,)).

    One token per row (T == 1, decode) touches B distinct pages in row order (row b's pages are
    b * NB .. b * NB + NB - 1), so no ``unique``: it would sync with the host and give a
    data-dependent shape, which a CUDA graph cannot capture. Prefill chunks share pages.
    """
    if blocks.shape[1] == 1:
        return blocks.flatten(), torch.arange(blocks.shape[0], device=blocks.device)
    return blocks.flatten().unique(return_inverse=True)


class _Writes(NamedTuple):
    """Where a forward pass writes its T tokens per row: the same for every layer."""

    pages: torch.Tensor           # (B * T,) each token's global page
    offsets: torch.Tensor         # (B * T,) its slot in the page
    rows: torch.Tensor            # (B * T,) its row in a store's token view
    ids: torch.Tensor | None      # FP8: (N,) the distinct touched pages, ascending (re-encoded whole)
    inv: torch.Tensor | None      # FP8: (B * T,) each token's index in ids
    probe_rows: torch.Tensor | None   # (B * T,) each token's row in a store's probe copy (or its dump row)


class OffloadKVCache:
    def __init__(self, n_layers: int, batch: int, capacity: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str, layer_configs: list[HiPConfig],
                 config: OffloadConfig = OffloadConfig()):
        device = torch.device(device)
        page, unit = config.page, config.capacity_unit
        nb = -(-capacity // unit) * unit // page
        self.page, self.nb, self.capacity = page, nb, nb * page
        self.block_size, self.dtype, self.device = page, dtype, device
        self.row0, self._batch = 0, batch
        self.is_view = False     # select(): some rows of a cache that owns the rest
        self._held: tuple[int, torch.Tensor, torch.Tensor] | None = None   # hold(): (layer, k, v) pages
        if config.gpu_layers is None:   # automatic placement, checked against the memory free now
            config = plan_offload(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, batch=batch,
                                  capacity=capacity, dtype=dtype, device=device, layer_configs=layer_configs,
                                  config=config).config
        self.config = config
        on_gpu = set(gpu_layer_order(layer_configs, batch, n_kv_heads, config)[:config.gpu_layers])
        self.gpu_layers = tuple(sorted(on_gpu))
        self.stores = [HostKVStore(batch * nb, page, n_kv_heads, head_dim, dtype, config.fp8, device,
                                   on_device=i in on_gpu, probe_stride=config.probe_stride) for i in range(n_layers)]
        slots = cache_slots(layer_configs, batch, n_kv_heads, config)
        # Layers read in place (GPU-stored, or all without decode_cache) have no page cache.
        self.caches = [PageCache(s, n, device) if config.decode_cache and i not in on_gpu else None
                       for i, (s, n) in enumerate(zip(self.stores, slots))]

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def n_layers(self) -> int:
        return len(self.stores)

    @property
    def host_nbytes(self) -> int:
        """Bytes of the host-stored layers' stores."""
        return sum(s.host_nbytes for s in self.stores)

    @property
    def gpu_nbytes(self) -> int:
        """Bytes this cache holds on the device: GPU-stored layers, page caches (pools, tables), FP8 scales."""
        return sum(c.nbytes for c in self.caches if c is not None) + sum(s.device_nbytes for s in self.stores)

    @property
    def page_caches(self) -> list[PageCache]:
        """The host-stored layers' page caches (their stats: hits, misses, evictions)."""
        return [c for c in self.caches if c is not None]

    def select(self, rows: slice) -> "OffloadKVCache":
        """A cache over batch rows ``rows`` that shares this one's storage."""
        start, stop, _ = rows.indices(self._batch)
        view = object.__new__(OffloadKVCache)
        view.__dict__.update(self.__dict__)
        view.row0, view._batch, view.is_view = self.row0 + start, stop - start, True
        return view

    def hold(self, layer: int | None, filled: int = 0):
        """Prefill layer by layer (``engine/layer_prefill.py``): keep ``layer``'s pages of this
        cache's rows in device memory too, the first ``filled`` tokens copied from the store and
        later writes mirrored, and read them there (the store's bytes: the same results). None
        lets go. One layer at a time: the layer's K/V for the rows' whole capacity."""
        self._held = None   # first: the last layer's copy is freed before the next one is made
        if layer is None or self.stores[layer].on_device:
            return
        s, dev = self.stores[layer], self.stores[layer].dk.device
        # Zeros, as the store's unwritten slots: kernels may load a partial page's slots past the
        # keys (masked out of the softmax) and uninitialized memory can hold NaN, which 0 * NaN keeps.
        k = torch.zeros((self._batch * self.nb, *s.dk.shape[1:]), dtype=s.dk.dtype, device=dev)
        v = torch.zeros_like(k)
        n = -(-filled // self.page)
        if n:
            local = (torch.arange(self._batch, device=dev)[:, None] * self.nb + torch.arange(n, device=dev)).flatten()
            k[local], v[local] = s.dk[local + self.row0 * self.nb], s.dv[local + self.row0 * self.nb]
        self._held = (layer, k, v)

    def _mirror(self, layer: int, pages: torch.Tensor):
        """After a write to ``pages`` (global ids) of a held layer: copy them from the store."""
        if self._held is None or self._held[0] != layer:
            return
        store, (_, k, v) = self.stores[layer], self._held
        pages = pages.unique()
        k[pages - self.row0 * self.nb], v[pages - self.row0 * self.nb] = store.dk[pages], store.dv[pages]

    def held(self, layer: int) -> bool:
        return self._held is not None and self._held[0] == layer

    def plan_write(self, start: torch.Tensor, T: int) -> "_Writes":
        """Where ``update`` writes T tokens per row at ``start`` (B,): the same for every layer,
        so a forward pass computes it once (a decode step: ~8 small kernels fewer per layer)."""
        B, dev = start.shape[0], self.stores[0].dk.device
        pos = start.to(dev)[:, None] + torch.arange(T, device=dev)                 # (B, T)
        rows = self.row0 + torch.arange(B, device=dev)[:, None]
        pages = rows * self.nb + pos // self.page                                   # (B, T) global pages
        ids, inv = touched_pages(pages) if self.config.fp8 else (None, None)
        offsets = (pos % self.page).flatten()
        tokens = (rows * self.capacity + pos).flatten()
        # The probe-copy rows, where the torch path writes (a CUDA decode step writes in one kernel
        # that finds them itself); every host store has the same rows.
        probed = next((s for s in self.stores if s.dk_probe is not None), None)
        torch_path = T > 1 or dev.type != "cuda"
        probe_rows = probed.probe_rows(tokens) if probed is not None and torch_path else None
        return _Writes(pages.flatten(), offsets, tokens, ids, inv, probe_rows)

    def write_target(self, layer: int, plan) -> None:
        """None: the store takes its writes through ``update`` (pages, FP8, the page cache's copies)."""
        return None

    def update(self, layer: int, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: "_Writes" = None):
        """Write k, v (B, T, K, D) at positions ``start[b] + t`` into the layer's store (host, or
        GPU for a GPU-stored layer); return its logical (B, capacity, K, D) device views (FP8 codes
        when ``config.fp8``). plan: ``plan_write(start, T)`` when the caller made it already. With
        T == 1 (decode) it runs no host sync and no data-dependent shape: CUDA-graph capturable."""
        T = k.shape[1]
        store, cache = self.stores[layer], self.caches[layer]
        w = plan if plan is not None else self.plan_write(start, T)
        k, v = k.flatten(0, 1), v.flatten(0, 1)                                      # (B * T, K, D)
        if T == 1 and store.dk.is_cuda:   # decode: what follows, in one launch
            from ..attention.triton.kv_write import write_decode_tokens   # triton: CUDA only
            write_decode_tokens(store, cache, w.pages, w.offsets, k, v)
        elif store.fp8:   # re-encode the touched pages whole: one scale per page
            kp, vp = store.read(w.ids)                                              # (N, page, K, D)
            kp[w.inv, w.offsets], vp[w.inv, w.offsets] = k.to(kp), v.to(vp)
            # Nothing past the last token written to a page is this sequence's yet: a batch slot's
            # earlier request may have left keys there, whose maximum would set the page's scale.
            last = torch.full((kp.shape[0],), -1, dtype=torch.long, device=kp.device)
            last = last.scatter_reduce(0, w.inv, w.offsets, "amax")
            empty = torch.arange(self.page, device=kp.device) > last[:, None]               # (N, page)
            kp[empty], vp[empty] = 0, 0
            store.write(w.ids, kp, vp)
            if cache is not None and T == 1:   # the slots get what a re-fetch would give
                cache.write_pages(w.ids, *store.read(w.ids))
        else:
            store.dk.view(-1, *k.shape[1:])[w.rows] = k.to(store.dk.device, store.dtype)
            store.dv.view(-1, *v.shape[1:])[w.rows] = v.to(store.dk.device, store.dtype)
            if store.dk_probe is not None:
                store.dk_probe[w.probe_rows] = k.to(store.dk_probe)
            if cache is not None and T == 1:
                cache.write_tokens(w.pages, w.offsets, k, v)
        if cache is not None and T > 1:      # prefill: not captured, drop the copies
            cache.invalidate(w.pages)
        # Every write of a held layer, also a prefill's last chunk of one token (it takes the decode
        # path above); nothing held (decode): returns at once, no sync, capturable.
        self._mirror(layer, w.pages)
        return self._logical(layer)

    def read_prefix(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row 0's first ``n`` keys and values (n, K, D) in the model dtype, copied to host memory
        (a cached document can be far larger than the GPU)."""
        k, v = _LayerSource(self.select(slice(0, 1)), layer).dense(n)
        return k[0].to("cpu", self.dtype, copy=True), v[0].to("cpu", self.dtype, copy=True)

    def copy_prefix(self, src: int, dst: int, n: int):
        """Batch row ``src``'s first ``n`` positions (whole pages: FP8 codes and scales as stored)
        into row ``dst``, in every layer; dst's copies in the page caches are dropped."""
        pages = torch.arange(-(-n // self.page))
        for store, cache in zip(self.stores, self.caches):
            to = (self.row0 + dst) * self.nb + pages
            store.put_raw(to, store.raw((self.row0 + src) * self.nb + pages))
            if cache is not None:
                cache.invalidate(to)

    def _page(self, row: int, pos: int) -> torch.Tensor:
        """(1,) the global id of the page holding batch row ``row``'s position ``pos``."""
        return torch.tensor([(self.row0 + row) * self.nb + pos // self.page])

    def read_position(self, row: int, pos: int) -> list[list[torch.Tensor]]:
        """What a write at ``(row, pos)`` can change, in every layer: its page (an FP8 write
        re-encodes the page whole), for ``write_position``."""
        return [store.raw(self._page(row, pos)) for store in self.stores]

    def write_position(self, row: int, pos: int, saved: list[list[torch.Tensor]]):
        """Put back what ``read_position`` read at ``(row, pos)``; the page caches drop their copies."""
        page = self._page(row, pos)
        for store, cache, parts in zip(self.stores, self.caches, saved):
            store.put_raw(page, parts)
            if cache is not None:
                cache.invalidate(page)

    def attention(self, layer: int):
        """``hip_attention`` for this layer (same keywords); k/v arguments give only Tk."""
        cached = self.caches[layer] is not None      # host-stored, with decode_cache

        def attend(q, k, v, **kw):
            # Not through a view of some rows (a joining row's prefill): its plan could evict the
            # units of rows that reuse their masks, which fetch only at their refreshes.
            fetch = cached and q.shape[1] <= DECODE_QUERIES and not self.is_view
            return paged_hip_attention(q, _LayerSource(self, layer), k.shape[1], fetch=fetch, **kw)
        return attend

    def prune(self, layer: int):
        """The pruning half of ``attention`` over the layer's first ``tk`` keys, probing the store
        in place: ``prune(q, tk, **hip_attention keywords) -> HiPMask | None``."""
        return lambda q, tk, **kw: paged_prune(q, _LayerSource(self, layer), tk, **kw)

    def _logical(self, layer: int):
        if self.held(layer):
            _, k, v = self._held
            return k.view(self._batch, self.capacity, *k.shape[2:]), v.view(self._batch, self.capacity, *v.shape[2:])
        s = self.stores[layer]
        rows = slice(self.row0, self.row0 + self._batch)
        k = s.dk.view(-1, self.capacity, *s.dk.shape[2:])[rows]                    # (B, capacity, K, D)
        return k, s.dv.view(-1, self.capacity, *s.dv.shape[2:])[rows]


class _LayerSource:
    """One layer of an ``OffloadKVCache`` as the ``KVSource`` that ``paged_hip_attention`` reads."""

    def __init__(self, cache: OffloadKVCache, layer: int):
        self.cache, self.layer = cache, layer
        self.on_host = not (cache.stores[layer].on_device or cache.held(layer))

    def logical(self, tk: int):
        c, s = self.cache, self.cache.stores[self.layer]
        k, v = c._logical(self.layer)
        rows = slice(c.row0, c.row0 + c.batch)
        pages = {}
        if s.dk_probe is not None:     # (B, capacity / stride, K, D): rows of a capacity that the stride divides
            pages.update(probes=s.dk_probe[:-1].view(-1, c.capacity // s.probe_stride, *s.dk_probe.shape[1:])[rows],
                         probe_stride=s.probe_stride)
        if s.fp8:
            scale = lambda x: x.view(-1, c.nb, x.shape[2])[rows]   # noqa: E731  (B, NB, K)
            pages.update(k_scale=scale(s.dk_scale), v_scale=scale(s.dv_scale))
        return k[:, :tk], v[:, :tk], KVPages(c.page, **pages) if pages else None

    def dense(self, tk: int):
        c, s = self.cache, self.cache.stores[self.layer]
        if not s.fp8:
            return self.logical(tk)[:2]
        n = -(-tk // c.page)
        dev = s.dk.device   # index on the store's device: a host-made index is a copy no graph captures
        ids = ((c.row0 + torch.arange(c.batch, device=dev))[:, None] * c.nb + torch.arange(n, device=dev)).flatten()
        # The rows' first n pages of codes (the store's, or the held copy of them), decoded.
        kc, vc = (t.view(c.batch, c.nb, c.page, *t.shape[2:])[:, :n].flatten(0, 1) for t in c._logical(self.layer))
        k, v = fp8_decode(kc, s.dk_scale[ids], s.dtype), fp8_decode(vc, s.dv_scale[ids], s.dtype)   # (B n, page, K, D)
        shape = (c.batch, n * c.page, *k.shape[2:])
        return k.view(shape)[:, :tk], v.view(shape)[:, :tk]

    def fetch(self, starts: torch.Tensor, geo, config: HiPConfig):
        c, K = self.cache, self.cache.stores[self.layer].k.shape[2]
        if starts.is_cuda:       # the same units in one launch (Triton: CUDA only)
            from ..attention.triton.page_cache import needed_units_cuda as needed
        else:
            needed = needed_units
        c.caches[self.layer].fetch(needed(starts, geo, config, c.page, K, c.row0, c.nb))   # static: absent are -1
        return self.resident()

    def resident(self):
        c, cache = self.cache, self.cache.caches[self.layer]
        table = cache.table(c.nb)[c.row0:c.row0 + c.batch]                           # (B, NB, K)
        return cache.k, cache.v, KVPages(c.page, table=table)
