"""The multi-stage pruning driver, shared by every backend.

A backend supplies ``pool_queries`` (the rotated, pooled pruning queries), ``score_chunks``
(hierarchical top-1 representative search, the expensive part) and ``keep_top`` (the best
chunks of each row in position order, already split into the next stage's candidates), so a
stage is two launches and a refresh adds one per distinct pooling stride: on the GPU the glue
between stages used to cost more than the pruning. Candidates stay int32 (the dtype the mask
saves them in) from stage to stage. Nothing here syncs with the host, so a decode step stays
CUDA-graph capturable.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch

from ..config import HiPConfig
from . import reference
from .mask import Geometry, HiPMask
from .reference import pool_queries
from .rope import RoPE

__all__ = ["ScoreChunks", "n_groups", "first_stage_starts", "run_stages"]


class ScoreChunks(Protocol):
    def __call__(self, qp: torch.Tensor, q_valid: torch.Tensor, k: torch.Tensor, starts: torch.Tensor,
                 chunk: int, geo: Geometry, config: HiPConfig, rope: RoPE | None, *,
                 levels: int | None = None) -> torch.Tensor:
        """Scores (B, G, NQB, n) float32 of chunks ``[starts, starts + chunk)`` (NEG_SCORE if inactive),
        the hierarchical top-1 stopped after ``levels`` levels (None: down to one token)."""


def n_groups(config: HiPConfig, num_kv_heads: int) -> int:
    """Number of head groups that share one mask."""
    return num_kv_heads if config.head_sharing == "kv" else 1


def first_stage_starts(tk: int, chunk: int, B: int, G: int, nqb: int, device=None) -> torch.Tensor:
    """Stage 0 scores every chunk of the context: starts (B, G, NQB, ceil(tk / chunk)) int32."""
    return _chunk_starts(-(-tk // chunk), chunk, torch.device(device or "cpu")).expand(B, G, nqb, -1)


@functools.lru_cache(maxsize=64)
def _chunk_starts(n: int, chunk: int, device: torch.device) -> torch.Tensor:
    """Constant per context length, cached like ``mask``'s constants (a CUDA graph captures it as
    a static buffer; the eager call that precedes a capture makes it)."""
    return torch.arange(0, n * chunk, chunk, dtype=torch.int32, device=device)


def run_stages(q, k, geo: Geometry, config: HiPConfig, rope: RoPE | None, score_chunks: ScoreChunks,
               mask: HiPMask | None = None, from_stage: int = 0, row_stage: torch.Tensor | None = None,
               keep_top=reference.keep_top, pool=pool_queries) -> HiPMask:
    """Prune from stage ``from_stage`` (reusing ``mask.stage_inputs`` for it) to the final mask.

    q: (B, Tq, H, D), k: (B, Tk, K, D), both un-rotated. Returns a new HiPMask (sharing the
    saved stage inputs it did not recompute with ``mask``).
    row_stage: optional (B,) int64, each row's own first stage to rerun (``from_stage`` is their
    minimum). A row refreshing from r keeps its saved input for every stage s <= r (and its
    saved final chunks when r == n_stages), so its mask is what a call of its own would give;
    the batch still runs as one, rows that keep a stage just score it needlessly.
    keep_top, pool: the backend's ``keep_top`` and ``pool_queries``.
    """
    B, tk, K, _ = k.shape
    G, nqb = n_groups(config, K), geo.p0.shape[1]
    if from_stage > 0 and mask is None:
        raise ValueError(f"refreshing from stage {from_stage} needs the previous call's mask")
    if from_stage == 0:
        starts = first_stage_starts(tk, config.chunk_sizes[0], B, G, nqb, k.device)
    else:
        starts = mask.stage_inputs[from_stage]
    inputs = list(mask.stage_inputs) if mask is not None else [None] * config.n_stages
    keep = (lambda s: (row_stage >= s)[:, None, None, None]) if row_stage is not None else None
    pooled = {}
    for s in range(from_stage, config.n_stages):
        if s > 0:
            if keep is not None and s > from_stage:
                starts = torch.where(keep(s), mask.stage_inputs[s], starts)
            inputs[s] = starts   # (B, G, NQB, n_s) int32; stage 0's input is recomputed, never stored
        # One query (decode) is its own pooled query at every stride: pooled once for all stages.
        stride = config.stage_strides[s] if q.shape[1] > 1 else 1
        if stride not in pooled:
            pooled[stride] = pool(q, geo, stride, rope)
        scores = score_chunks(*pooled[stride], k, starts, config.chunk_sizes[s], geo, config, rope,
                              levels=config.probe_levels(s))
        last = s + 1 == config.n_stages
        split = None if last else (config.chunk_sizes[s], config.chunk_sizes[s + 1])
        starts = keep_top(starts, scores, config.n_kept(s), split)   # sorted; the next stage's candidates
    final = starts
    if keep is not None:
        final = torch.where(keep(config.n_stages), mask.starts, final)
    return HiPMask(final, tuple(inputs), _stage0_anchor(geo, mask, from_stage, row_stage))


def _stage0_anchor(geo: Geometry, mask: HiPMask | None, from_stage: int, row_stage: torch.Tensor | None):
    """The window start to remember: fresh where stage 0 reran, the saved one elsewhere."""
    if mask is None or mask.w0 is None or (row_stage is None and from_stage == 0):
        return geo.w0
    if row_stage is None:
        return mask.w0
    return torch.where(row_stage[:, None] > 0, mask.w0.to(geo.w0), geo.w0)
