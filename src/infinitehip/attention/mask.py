"""The sparse mask shared by the reference and the kernels, and the geometry it lives in.

For a query block whose first query sits at position ``p0``:

    keys:   [0, sink)          sink           always attended (causally)
            [sink, w0)          selectable     pruning picks chunks here;  w0 = p0 - window + 1
            [max(w0, sink), p]  window         causal, per row p

so the three sets are disjoint and a context of at most sink + window keys is attended exactly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import HiPConfig

# Start of an empty mask entry. Sorting ascending puts empty entries last.
SENTINEL = torch.iinfo(torch.int32).max
# Score of an inactive chunk: large but finite, so top-k and sort never see inf/nan.
NEG_SCORE = -1.0e30
# Pruning in relative RoPE mode rotates every query at this distance from every probe key.
RELATIVE_QUERY_DISTANCE = 1


@dataclass
class HiPMask:
    """Pruning result for one attention call, reusable by later decode steps.

    starts:       (B, G, NQB, n_selected) int32 — sorted starts of the selected chunks (each
                  ``config.chunk_size`` keys), ``SENTINEL`` where fewer were found.
    stage_inputs: per stage s, the candidate chunk starts it scored, (B, G, NQB, n_s) int32;
                  kept so a decode refresh can rerun stage s without the stages before it.
    w0:           (B, NQB) int64, the window start when stage 0 last ran. Chunks were picked
                  below it, so while the mask is reused the window stays anchored there: keys
                  that slide out of the moving window are never dropped between refreshes.
    G is the number of head groups sharing a mask (K for head_sharing="kv", 1 for "all").
    """

    starts: torch.Tensor
    stage_inputs: tuple[torch.Tensor, ...]
    w0: torch.Tensor | None = None

    def copy_(self, other: "HiPMask") -> "HiPMask":
        """Overwrite in place (static buffers for CUDA graphs)."""
        self.starts.copy_(other.starts)
        for mine, theirs in zip(self.stage_inputs, other.stage_inputs):
            if mine is not None:
                mine.copy_(theirs)
        if self.w0 is not None:
            self.w0.copy_(other.w0)
        return self

    def clone(self) -> "HiPMask":
        return self._map(torch.clone)

    def where(self, rows: torch.Tensor, other: "HiPMask") -> "HiPMask":
        """A new mask: rows ``rows`` ((B,) bool) from ``other``, the others from this one."""
        def pick(mine, theirs):
            if mine is None or theirs is None:   # a field neither mask keeps (stage 0's input)
                return theirs if mine is None else mine
            return torch.where(rows.view(-1, *[1] * (mine.dim() - 1)), theirs.to(mine), mine)
        picked = [pick(a, b) for a, b in zip(self._tensors(), other._tensors())]
        return HiPMask(picked[0], tuple(picked[1:-1]), picked[-1])

    def query_blocks(self, blocks: slice) -> "HiPMask":
        """The mask of the query blocks ``blocks`` (a slice of NQB)."""
        return self._map(lambda t: t[:, blocks] if t.dim() == 2 else t[:, :, blocks])

    @staticmethod
    def cat_query_blocks(masks: list["HiPMask"]) -> "HiPMask":
        """Masks of consecutive query-block slices -> one mask (the inverse of ``query_blocks``)."""
        fields = zip(*(m._tensors() for m in masks))
        # NQB is dim 1 of the window starts (B, NQB) and dim 2 of the chunk lists (B, G, NQB, n).
        cat = [None if ts[0] is None else torch.cat(ts, dim=1 if ts[0].dim() == 2 else 2) for ts in fields]
        return HiPMask(cat[0], tuple(cat[1:-1]), cat[-1])

    def _tensors(self):
        return (self.starts, *self.stage_inputs, self.w0)

    def _map(self, fn) -> "HiPMask":
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return HiPMask(f(self.starts), tuple(f(t) for t in self.stage_inputs), f(self.w0))


def window_slots(config: HiPConfig) -> int:
    """Window keys a query block may attend: ``window`` plus the block's own rows, plus the
    positions the window may stay anchored behind while a mask is reused (< refresh_intervals[0]
    + refresh_lag: a mask takes effect ``refresh_lag`` steps after the step that pruned it)."""
    return config.window + config.block_size_q + config.refresh_intervals[0] + config.refresh_lag - 2


def lookahead(config: HiPConfig) -> int:
    """Tokens a decode row adds after a mask takes effect before the next one does, at the latest
    (a row refreshes every ``min(refresh_intervals)`` steps or sooner, and the first deferred
    refresh takes effect ``refresh_lag`` steps after it): what a cache that moves pages when a
    mask takes effect (``offload_kv``) must have room for beyond the last query."""
    return min(config.refresh_intervals) + config.refresh_lag - 1


def empty_mask(config: HiPConfig, batch: int, groups: int, n_query_blocks: int, device=None) -> HiPMask:
    """A mask that selects nothing: attention over sink + window only (StreamingLLM).

    Pass it with ``refresh_stage=config.n_stages`` so it is used as is.
    """
    starts = torch.full((batch, groups, n_query_blocks, config.n_selected), SENTINEL,
                        dtype=torch.int32, device=device)
    return HiPMask(starts, (None,) * config.n_stages)


@dataclass
class Geometry:
    """Positions of one call's query blocks, all (B, NQB) int64 unless noted."""

    p0: torch.Tensor          # first query position of each block
    w0: torch.Tensor          # window start of the block's first row; selected keys lie below it
    q_pos: torch.Tensor       # (B, NQB, block_size_q) position of every (padded) query row
    q_valid: torch.Tensor     # (B, NQB, block_size_q) bool, False on padding rows
    exact_prune: torch.Tensor   # (B,) bool: exact RoPE positions in pruning (else relative)
    exact_attend: torch.Tensor  # (B,) bool: exact RoPE positions in attention (else streaming)


def geometry(q_pos0: torch.Tensor, tq: int, kv_len: torch.Tensor, config: HiPConfig) -> Geometry:
    """Query-block geometry for queries at ``q_pos0[b] + t``, t < tq, against ``kv_len[b]`` keys.

    Every layer of a decode step runs this, so it launches three or four small kernels: the
    constant tensors are cached per device (a CUDA graph captures them as static buffers).
    """
    bq = config.block_size_q
    nqb = -(-tq // bq)
    dev = q_pos0.device
    p0 = q_pos0.long()[:, None] + _arange(nqb, dev, step=bq)         # (B, NQB)
    q_pos = p0[..., None] + _arange(bq, dev)                          # (B, NQB, bq)
    q_valid = valid_rows(tq, nqb, bq, dev).expand_as(q_pos)
    w0 = p0 - (config.window - 1)
    rules = {mode: exact_rule(mode, config) for mode in (config.rope_prune, config.rope_attend)}
    exact = {rule: _exact(rule, kv_len, config) for rule in set(rules.values())}
    return Geometry(p0, w0, q_pos, q_valid, exact[rules[config.rope_prune]], exact[rules[config.rope_attend]])


def anchor_window(geo: Geometry, mask: HiPMask | None, config: HiPConfig,
                  rows: torch.Tensor | None = None) -> Geometry:
    """Keep the window where stage 0 last pruned (``mask.w0``) while its chunks are reused,
    but never so far back that the newest keys fall outside the window slots.

    rows: optional (B,) bool, the rows that reuse stage 0 (default all); the others keep ``geo``.
    """
    if mask is None or mask.w0 is None:
        return geo
    lowest = geo.p0 + config.block_size_q - window_slots(config)
    w0 = torch.maximum(torch.minimum(geo.w0, mask.w0.to(geo.w0)), lowest)
    if rows is not None:
        w0 = torch.where(rows[:, None], w0, geo.w0)
    return Geometry(geo.p0, w0, geo.q_pos, geo.q_valid, geo.exact_prune, geo.exact_attend)


def exact_rule(mode: str, config: HiPConfig) -> str:
    """When a RoPE mode uses exact positions: "always", "within" the trained context, or "never"."""
    if mode == "exact":
        return "always"
    return "within" if mode == "auto" and config.model_context_length is not None else "never"


def _exact(rule: str, kv_len: torch.Tensor, config: HiPConfig) -> torch.Tensor:
    """(B,) bool, contiguous (kernels index it by row)."""
    if rule == "within":
        return kv_len <= config.model_context_length
    return _constant(rule == "always", kv_len.shape[0], kv_len.device)


@functools.lru_cache(maxsize=None)
def _arange(n: int, device: torch.device, step: int = 1) -> torch.Tensor:
    return torch.arange(0, n * step, step, device=device)


def pooled_rows(tq: int, bq: int, stride: int) -> int:
    """Rows of a query block that pruning pools: one query (decode) pools only itself (and every
    stage then shares its pooled query: ``stages.run_stages``); more pool the whole padded block,
    as prefill's blocks do. Pooling only a short prompt tail's real rows made each tail length its
    own Triton compilation (``ROWS`` and ``R`` are compile-time): ~20-30 s on first use of every
    new length of a server's second question about a document (H200, docs/server.md)."""
    return stride if tq == 1 else bq


@functools.lru_cache(maxsize=256)
def valid_rows(tq: int, nqb: int, bq: int, device: torch.device) -> torch.Tensor:
    """(1, NQB, bq) bool: which rows of the padded query blocks are real queries."""
    return (torch.arange(nqb * bq, device=device) < tq).view(1, nqb, bq)


@functools.lru_cache(maxsize=256)
def _constant(value: bool, n: int, device: torch.device) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.bool, device=device)
