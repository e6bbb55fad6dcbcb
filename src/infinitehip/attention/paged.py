"""``hip_attention`` over keys and values that do not sit in one device tensor (KV offloading).

The caller supplies a ``KVSource``: the logical K/V (B, Tk, K, D) readable in place by the
kernels (a zero-copy device alias of host memory, maybe FP8 codes with per-page scales), and,
for decode, ``fetch`` — make the pages a final mask selects resident in a device page pool (with
the window's pages until the next refresh) and return that pool and its block table — and
``resident``, the same without fetching, for the steps that reuse the mask. The steps are
``hip_attention``'s, in its own helpers: prune over the logical keys, then attend either in
place (prefill) or through the pool (decode).
With plain (non-FP8) storage and no fetch this is ``hip_attention`` itself, so results are the
all-on-device path's, bit for bit; with a fetch the attention kernels read the same values
through the table, so they are too (tested).

A prefill chunk of at least ``STAGE_QUERIES`` queries first copies the layer's K/V (or FP8 codes)
to device memory and reads the copy: the same values, the same kernels, so the same results.
Read in place, each of the chunk's query blocks probes and attends over PCIe on its own. (A
whole prompt prefilled layer by layer reads the layer's pages held in device memory instead:
``engine/layer_prefill.py``.)
"""
from __future__ import annotations

import functools
import math
from typing import Protocol, Sequence

import torch

from ..config import HiPConfig
from . import api
from .mask import HiPMask
from .pages import KVPages
from .rope import RoPE


# A chunk of this many queries (16 query blocks of 64) reads more over PCIe in place than one copy of
# the layer: in place, each query block's stage-0 probes read ~16 bytes per key and kv head and its
# sink, window and budget ~3.3K keys (8B shape: 8 kv heads); the copy moves K and V once, 4 KB a key.
STAGE_QUERIES = 1024


class KVSource(Protocol):
    on_host: bool   # the store is in host memory (read in place through a device alias)

    def logical(self, tk: int) -> tuple[torch.Tensor, torch.Tensor, KVPages | None]:
        """k, v (B, Tk, K, D) readable in place on the queries' device; pages: FP8 scales or None."""

    def dense(self, tk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Tk, K, D) in the compute dtype, for the dense path of short contexts."""

    def fetch(self, starts: torch.Tensor, geo, config: HiPConfig) -> tuple[torch.Tensor, torch.Tensor, KVPages]:
        """Make resident every page the mask ``starts`` (B, G, NQB, NSEL), the sink and the window
        read until the next refresh; return the page pools (N, page, K, D) and pages with the
        block table."""

    def resident(self) -> tuple[torch.Tensor, torch.Tensor, KVPages]:
        """The pools and table as the last ``fetch`` left them (a step that reuses its mask)."""


def paged_hip_attention(q: torch.Tensor, source: KVSource, tk: int, *, config: HiPConfig, rope: RoPE | None,
                        scale: float | None, cache_seqlens: torch.Tensor, mask: HiPMask | None = None,
                        refresh_stage: int | Sequence[int] = 0, backend: str = "auto",
                        fetch: bool = False, fresh: bool = False) -> tuple[torch.Tensor, HiPMask | None]:
    """``cache_attention(q, k, v, ...)`` (the engine's hip_attention) with k/v the first ``tk``
    keys of ``source``.

    q (B, Tq, H, D) un-rotated; cache_seqlens (B,) valid keys per row. ``fetch``: attend through
    the source's page pool (decode: a few pages per step) instead of reading the logical K/V in
    place (prefill). ``fresh``: ``mask`` is reused but no fetch has seen it yet (it was pruned
    ``refresh_lag`` steps ago and takes effect now), so its pages are fetched.
    Returns (out (B, Tq, H, D), mask or None when attention was dense).
    """
    k, v, pages = source.logical(tk)
    B, tq, _, D = q.shape
    fp8 = pages is not None and pages.k_scale is not None
    if not fetch and tq >= STAGE_QUERIES and source.on_host and not (fp8 and api._use_dense(tk, config)):
        k, v = _staged(k, v, q.device)   # (FP8's dense path decodes from the store instead)
    if pages is None and not fetch:
        return api.cache_attention(q, k, v, config=config, rope=rope, scale=scale, cache_seqlens=cache_seqlens,
                                   mask=mask, refresh_stage=refresh_stage, backend=backend)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kv_len = cache_seqlens.to(device=q.device, dtype=torch.long)
    if api._use_dense(tk, config):
        kd, vd = source.dense(tk) if fp8 else (k, v)
        return api.dense_attention(q, kd, vd, kv_len, rope, scale), None
    from_stage, row_stage = api._refresh_rows(refresh_stage, B, config, mask, q.device)
    backend = api.resolve_backend(backend, q)
    # Nothing to fetch: every row reuses a mask that an earlier, fetching call pruned (it carries
    # its window start). Not a mask made for this call: streaming's empty one (sink + window
    # only, no w0) moves its window every step, so its steps fetch.
    reuse = from_stage == config.n_stages and mask is not None and mask.w0 is not None and not fresh
    if api.reuses_in_one_launch(backend, from_stage, tq, config) and (reuse or not fetch):   # one launch
        from .triton import ops
        kr, vr, pr = source.resident() if fetch else (k, v, pages)   # the pool as it is, or FP8 in place
        return ops.attend_reused(q, kr, vr, mask, kv_len, config, rope, scale, pages=pr), mask
    impl = api.implementation(backend)

    def attend(qs, m, geo):
        kr, vr, pr = (source.resident() if reuse else source.fetch(m.starts, geo, config)) if fetch else (k, v, pages)
        return impl.attend(qs, kr, vr, m.starts, geo, config, rope, scale, pages=pr)

    return api.prune_and_attend(q, k, kv_len, config, rope, mask, from_stage, row_stage, backend,
                                functools.partial(impl.score_chunks, pages=pages), attend)


def _staged(k: torch.Tensor, v: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, Tk, K, D) copied to ``device`` memory; as they are where there is no room for the copy."""
    try:
        return k.to(device, copy=True), v.to(device, copy=True)
    except torch.OutOfMemoryError:
        return k, v


def paged_prune(q: torch.Tensor, source: KVSource, tk: int, *, config: HiPConfig, rope: RoPE | None,
                cache_seqlens: torch.Tensor, mask: HiPMask | None = None, refresh_stage: int | Sequence[int] = 0,
                backend: str = "auto", programs: int | None = None) -> HiPMask | None:
    """``api.cache_prune`` over ``source``'s logical keys: the probes read them in place (FP8
    codes with their scales, the GPU probe copy where there is one)."""
    k, _, pages = source.logical(tk)
    return api.prune_only(q, k, config, rope, cache_seqlens, mask, refresh_stage, backend, programs, pages)
