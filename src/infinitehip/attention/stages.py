"""The multi-stage pruning driver, shared by every backend.

A backend supplies ``score_chunks`` (hierarchical top-1 representative search, the expensive
part) and ``keep_top`` (the best chunks of each row, in position order); splitting chunks
between stages is a few torch ops. Nothing here syncs with the host, so a decode step stays
CUDA-graph capturable.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..config import HiPConfig
from . import reference
from .mask import RELATIVE_QUERY_DISTANCE, SENTINEL, Geometry, HiPMask
from .rope import RoPE, apply_rope


class ScoreChunks(Protocol):
    def __call__(self, qp: torch.Tensor, q_valid: torch.Tensor, k: torch.Tensor, starts: torch.Tensor,
                 chunk: int, geo: Geometry, config: HiPConfig, rope: RoPE | None) -> torch.Tensor:
        """Scores (B, G, NQB, n) float32 of chunks ``[starts, starts + chunk)`` (NEG_SCORE if inactive)."""


def n_groups(config: HiPConfig, num_kv_heads: int) -> int:
    """Number of head groups that share one mask."""
    return num_kv_heads if config.head_sharing == "kv" else 1


def pool_queries(q: torch.Tensor, geo: Geometry, stride: int, config: HiPConfig, rope: RoPE | None):
    """Rotate the queries for pruning, then average them in groups of ``stride`` rows per block.

    q: (B, Tq, H, D) -> qp (B, NQB, R, H, D) float32 with R = block_size_q // stride (a single
    query block: ceil(Tq / stride)), and q_valid (B, NQB, R) bool (False for groups made only
    of padding rows).
    Exact mode rotates each query at its offset from the block start (keys are then rotated at
    their offset too); relative mode rotates every query at a fixed small distance from keys
    that stay unrotated, so a chunk's score depends on its content, not on how far back it is.
    """
    B, tq, H, D = q.shape
    nqb, bq = geo.q_pos.shape[1:]
    # One query block (decode): pool only its real rows, so kernels never score padding groups.
    rows = bq if nqb > 1 else -(-tq // stride) * stride
    q_pos, q_valid = geo.q_pos[..., :rows], geo.q_valid[..., :rows]
    x = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, nqb * rows - tq)).view(B, nqb, rows, H, D)
    if rope is not None:
        pos = torch.where(geo.exact_prune[:, None, None], q_pos - geo.p0[..., None], RELATIVE_QUERY_DISTANCE)
        cos, sin = rope.cos_sin(pos)                                  # (B, NQB, rows, D/2)
        x = apply_rope(x, cos[..., None, :], sin[..., None, :])
    x = x * q_valid[..., None, None]
    R = rows // stride
    count = q_valid.reshape(B, nqb, R, stride).sum(-1)                # (B, NQB, R)
    qp = x.view(B, nqb, R, stride, H, D).sum(3) / count.clamp(min=1)[..., None, None]
    return qp, count > 0


def first_stage_starts(tk: int, chunk: int, B: int, G: int, nqb: int, device=None) -> torch.Tensor:
    """Stage 0 scores every chunk of the context: starts (B, G, NQB, ceil(tk / chunk)) int64."""
    return (torch.arange(-(-tk // chunk), device=device) * chunk).expand(B, G, nqb, -1)


def run_stages(q, k, geo: Geometry, config: HiPConfig, rope: RoPE | None, score_chunks: ScoreChunks,
               mask: HiPMask | None = None, from_stage: int = 0, row_stage: torch.Tensor | None = None,
               keep_top=reference.keep_top) -> HiPMask:
    """Prune from stage ``from_stage`` (reusing ``mask.stage_inputs`` for it) to the final mask.

    q: (B, Tq, H, D), k: (B, Tk, K, D), both un-rotated. Returns a new HiPMask.
    row_stage: optional (B,) int64, each row's own first stage to rerun (``from_stage`` is their
    minimum). A row refreshing from r keeps its saved input for every stage s <= r (and its
    saved final chunks when r == n_stages), so its mask is what a call of its own would give;
    the batch still runs as one, rows that keep a stage just score it needlessly.
    """
    B, tk, K, _ = k.shape
    G, nqb = n_groups(config, K), geo.p0.shape[1]
    if from_stage > 0 and mask is None:
        raise ValueError(f"refreshing from stage {from_stage} needs the previous call's mask")
    if from_stage == 0:
        starts = first_stage_starts(tk, config.chunk_sizes[0], B, G, nqb, k.device)
    else:
        starts = mask.stage_inputs[from_stage].long()
    inputs = list(mask.stage_inputs) if mask is not None else [None] * config.n_stages
    keep = (lambda s: (row_stage >= s)[:, None, None, None]) if row_stage is not None else None
    pooled = {}
    for s in range(from_stage, config.n_stages):
        if s > 0:
            if keep is not None and s > from_stage:
                starts = torch.where(keep(s), mask.stage_inputs[s].long(), starts)
            inputs[s] = starts.to(torch.int32)   # stage 0's input is recomputed, never stored
        # A single query block pools every stride >= Tq into one group: the same queries.
        stride = config.stage_strides[s] if nqb > 1 else min(config.stage_strides[s], q.shape[1])
        if stride not in pooled:
            pooled[stride] = pool_queries(q, geo, stride, config, rope)
        scores = score_chunks(*pooled[stride], k, starts, config.chunk_sizes[s], geo, config, rope)
        kept = keep_top(starts, scores, config.n_kept(s))                 # (B, G, NQB, n_kept) sorted
        if s + 1 < config.n_stages:
            starts = _split(kept, config.chunk_sizes[s], config.chunk_sizes[s + 1])
    final = kept.to(torch.int32)
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


def _split(starts: torch.Tensor, chunk: int, sub: int) -> torch.Tensor:
    """Cut each chunk of ``chunk`` tokens into chunks of ``sub``: (..., n) -> (..., n * chunk / sub)."""
    offsets = torch.arange(0, chunk, sub, device=starts.device)
    out = torch.where(starts[..., None] == SENTINEL, SENTINEL, starts[..., None] + offsets)
    return out.flatten(-2)
