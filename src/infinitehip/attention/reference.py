"""InfiniteHiP in plain, vectorized PyTorch: the specification of every kernel, and the CPU path.

One function per kernel:
  pool_queries  — the pruning queries: rotated, averaged in groups of rows.
  score_chunks  — hierarchical top-1: a chunk's score is its representative token's score.
  keep_top      — the best-scoring chunks of each row, in position order (split into the next
                  stage's candidates).
  block_geometry — positions of a single query block (decode), window anchored to a mask.
  attend        — block-sparse attention over sink + selected chunks + sliding window.
Everything is computed in float32; shapes use B batch, T tokens, H query heads, K kv heads,
D head dim, G head groups sharing a mask, NQB query blocks.
"""
from __future__ import annotations

import torch

from ..config import HiPConfig, descent_levels
from .mask import (NEG_SCORE, RELATIVE_QUERY_DISTANCE, SENTINEL, Geometry, HiPMask, anchor_window, geometry, pooled_rows,
                   window_slots)
from .pages import KVPages, gather_paged
from .rope import RoPE, apply_rope


def gather_kv(x: torch.Tensor, idx: torch.Tensor, groups: int, pages: KVPages | None = None,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x (B, T, K, D) at positions idx (B, G, ...) for the kv heads of each group.

    Returns (B, G, ..., K // G, D) float32; positions are clamped into [0, T) (callers mask them).
    With a block table (``pages.table``), x is a page pool shared by all rows and idx are logical
    positions (``pages.gather_paged``); with ``scale`` (B, NB, K), x holds FP8 codes of pages of
    ``pages.page`` tokens (see ``pages.py``).
    """
    if pages is not None and pages.table is not None:
        return gather_paged(x, idx, groups, pages)
    B = idx.shape[0]
    _, T, K, D = x.shape
    xg = x.view(B, T, groups, K // groups, D).transpose(1, 2)           # (B, G, T, KG, D)
    flat = idx.reshape(B, groups, -1).clamp(0, T - 1)
    b = torch.arange(B, device=x.device)[:, None, None]
    g = torch.arange(groups, device=x.device)[None, :, None]
    out = xg[b, g, flat].float()                                        # (B, G, N, KG, D)
    if scale is not None:
        sg = scale.view(B, -1, groups, K // groups).transpose(1, 2)     # (B, G, NB, KG)
        out = out * sg[b, g, (flat // pages.page).clamp(max=sg.shape[2] - 1)][..., None]
    return out.view(*idx.shape, K // groups, D)


def pool_queries(q: torch.Tensor, geo: Geometry, stride: int, rope: RoPE | None):
    """Rotate the queries for pruning, then average them in groups of ``stride`` rows per block.

    q: (B, Tq, H, D) -> qp (B, NQB, R, H, D) float32 with R = block_size_q // stride (one query:
    R = 1), and q_valid (B, NQB, R) bool (False for groups made only of padding rows).
    Exact mode rotates each query at its offset from the block start (keys are then rotated at
    their offset too); relative mode rotates every query at a fixed small distance from keys
    that stay unrotated, so a chunk's score depends on its content, not on how far back it is.
    """
    B, tq, H, D = q.shape
    nqb, bq = geo.q_pos.shape[1:]
    rows = pooled_rows(tq, bq, stride)
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


# Chunks up to this size are scored by scoring every key (``_token_scores``) when they cover
# the keys: 2 log2(c) probes of c tokens is half of them or more for c <= 16.
DENSE_CHUNK = 16


def _known_all(mask: torch.Tensor) -> bool:
    """Whether every element of a bool tensor is True, when that is free to know: on the CPU
    (read in place, no kernel: the reference is the CPU path, and skips work by it); elsewhere
    False, so the caller takes its general branch and never syncs with the device."""
    return mask.device.type == "cpu" and bool(mask.numpy().all())


def _token_scores(qp, q_valid, k, groups: int, rope: RoPE | None, pages: KVPages | None) -> torch.Tensor:
    """Max over pooled query rows and the group's heads of q·k for every key, unrotated (relative
    pruning: a rotation by 0): (B, G, NQB, Tk). What ``_probe_scores`` gives at any probe.
    pages: FP8 codes with per-page scales (decoded as ``gather_kv`` does)."""
    B, nqb, R, H, D = qp.shape
    K = k.shape[2]
    KG, J = K // groups, H // K
    keys = k.float()
    if pages is not None and pages.scaled:
        keys = keys * pages.k_scale.repeat_interleave(pages.page, dim=1)[:, :keys.shape[1], :, None]
    keys = keys.view(B, -1, groups, KG, D).permute(0, 2, 3, 4, 1)              # (B, G, KG, D, Tk)
    if rope is not None and rope.attention_scaling != 1.0:
        keys = keys * rope.attention_scaling
    q = qp.view(B, nqb, R, groups, KG, J, D).permute(0, 3, 4, 1, 2, 5, 6).reshape(B, groups, KG, -1, D)
    s = (q @ keys).view(B, groups, KG, nqb, R, J, -1)                          # (B, G, KG, NQB, R, J, Tk)
    if not _known_all(q_valid):
        s = s.masked_fill(~q_valid[:, None, None, :, :, None, None], float("-inf"))
    return s.amax(dim=(2, 4, 5))


def _probe_scores(qp, q_valid, k, probes, geo: Geometry, rope: RoPE | None, pages: KVPages | None = None):
    """Max over pooled query rows and the group's heads of q·k at each probe: (B, G, NQB, M)."""
    B, nqb, R, H, D = qp.shape
    G, K = probes.shape[1], k.shape[2]
    keys = gather_kv(k, probes, G, pages, None if pages is None else pages.k_scale)   # (B, G, NQB, M, KG, D)
    if rope is not None and _known_all(~geo.exact_prune):   # relative everywhere: a rotation by 0
        keys = keys if rope.attention_scaling == 1.0 else keys * rope.attention_scaling
    elif rope is not None:
        pos = torch.where(geo.exact_prune[:, None, None, None], probes - geo.p0[:, None, :, None], 0)
        cos, sin = rope.cos_sin(pos)
        keys = apply_rope(keys, cos[..., None, :], sin[..., None, :])
    q = qp.view(B, nqb, R, G, K // G, H // K, D)
    s = torch.einsum("bqrgkjd,bgqmkd->bgqmrkj", q, keys)
    if not _known_all(q_valid):   # padding rows (a ragged last block) score nothing
        s = s.masked_fill(~q_valid[:, None, :, None, :, None, None], float("-inf"))
    return s.amax(dim=(-3, -2, -1))


def score_chunks(qp, q_valid, k, starts, chunk: int, geo: Geometry, config: HiPConfig, rope: RoPE | None,
                 pages: KVPages | None = None, levels: int | None = None):
    """Hierarchical top-1 over chunks ``[starts, starts + chunk)`` of the selectable range.

    qp (B, NQB, R, H, D) float32 pooled rotated queries, q_valid (B, NQB, R),
    k (B, Tk, K, D), starts (B, G, NQB, n) int64 (SENTINEL = no chunk). Returns (B, G, NQB, n).
    Each level halves the candidate range: probe the middle of both halves, keep the better
    half. After log2(chunk) levels one token is left: the representative. The score is the best
    probe seen on the way. Probes are clamped into the chunk's selectable part [lo, hi).
    pages: read k through a block table or as FP8 codes with scales (``pages.py``).
    levels: stop the descent after this many levels (None: down to one token).
    """
    starts = starts.long()   # int32 starts: SENTINEL + chunk would wrap
    lo = starts.clamp(min=config.sink)
    hi = torch.minimum(starts + chunk, geo.w0[:, None, :, None])
    active = (starts != SENTINEL) & (lo < hi)
    a, length = starts, chunk
    best = torch.full(starts.shape, float("-inf"), device=k.device)
    # Small chunks over (nearly) all keys, unrotated: probes are half the keys or more, so score
    # every key at once (one matrix product, no gather) and pick the probes' scores from it.
    tokens = (chunk <= DENSE_CHUNK and starts.shape[-1] * chunk * 2 >= k.shape[1]
              and (pages is None or pages.table is None) and (rope is None or _known_all(~geo.exact_prune)))
    scores = _token_scores(qp, q_valid, k, starts.shape[1], rope, pages) if tokens else None
    for _ in range(descent_levels(chunk, levels)):
        half = length // 2
        probes = torch.stack([a + half // 2, a + half + half // 2], dim=-1)    # (B, G, NQB, n, 2)
        probes = torch.maximum(torch.minimum(probes, hi[..., None] - 1), lo[..., None])
        if scores is not None:
            s = scores.gather(-1, probes.flatten(-2).clamp(0, k.shape[1] - 1)).view(probes.shape)
        else:
            s = _probe_scores(qp, q_valid, k, probes.flatten(-2), geo, rope, pages).view(probes.shape)
        best = torch.maximum(best, s.amax(-1))
        a = a + (s[..., 1] > s[..., 0]) * half
        length = half
    return torch.where(active, best, NEG_SCORE)


def keep_top(starts: torch.Tensor, scores: torch.Tensor, m: int, split: tuple[int, int] | None = None) -> torch.Tensor:
    """The ``m`` best-scoring active chunks of each row, in position order: (..., m), starts' dtype.

    starts (..., n) ascending per row (SENTINEL last), scores (..., n) float32 (NEG_SCORE =
    inactive). Ties go to the earlier chunk. Rows with fewer than m active chunks are padded
    with SENTINEL, so stage widths depend on the config only and masks of rows with different
    lengths stack into one batch.
    split: (chunk, sub) — return the next stage's candidates instead: each kept chunk of
    ``chunk`` tokens cut into chunks of ``sub`` (``split_chunks``), (..., m * chunk // sub).
    """
    n = scores.shape[-1]
    rank = scores.argsort(dim=-1, descending=True, stable=True)[..., :m]       # (..., min(m, n))
    chosen = scores.gather(-1, rank) > NEG_SCORE / 2
    kept = torch.where(chosen, starts.gather(-1, rank), SENTINEL).sort(dim=-1).values
    kept = torch.nn.functional.pad(kept, (0, max(m - n, 0)), value=SENTINEL)
    return kept if split is None else split_chunks(kept, *split)


def split_chunks(starts: torch.Tensor, chunk: int, sub: int) -> torch.Tensor:
    """Cut each chunk of ``chunk`` tokens into chunks of ``sub``: (..., n) -> (..., n * chunk / sub)."""
    offsets = torch.arange(0, chunk, sub, device=starts.device)
    out = torch.where(starts[..., None] == SENTINEL, SENTINEL, starts[..., None] + offsets)
    return out.flatten(-2).to(starts.dtype)


def block_geometry(kv_len: torch.Tensor, tq: int, config: HiPConfig, mask: HiPMask | None = None,
                   rows: torch.Tensor | None = None) -> Geometry:
    """Geometry of one block of ``tq <= block_size_q`` queries ending at ``kv_len`` (B,), the
    window anchored to ``mask`` for ``rows`` (``anchor_window``; mask None: not anchored)."""
    geo = geometry(kv_len - tq, tq, kv_len, config)
    return geo if mask is None else anchor_window(geo, mask, config, rows)


def slot_indices(starts: torch.Tensor, geo: Geometry, config: HiPConfig):
    """Key index, RoPE position and validity of every attended slot.

    Slots are, in order: ``sink`` sink keys, ``n_selected * chunk_size`` selected keys,
    ``window_slots(config)`` window keys. Returns idx and pos (B, G, NQB, S) int64 and
    valid (B, G, NQB, bq, S) bool. Streaming positions keep window keys where they are and pack
    the sink and the selected chunks, in order, just before the window.
    """
    B, G, nqb, nsel = starts.shape
    c, sink, dev = config.chunk_size, config.sink, starts.device
    n_window = window_slots(config)
    w0 = geo.w0[:, None, :, None]                                      # (B, 1, NQB, 1)
    wst = torch.clamp(w0, min=sink)
    starts = starts.long()
    chunk_ok = starts != SENTINEL                                      # (B, G, NQB, NSEL)

    sink_idx = torch.arange(sink, device=dev).expand(B, G, nqb, sink)
    sel_idx = (starts[..., None] + torch.arange(c, device=dev)).flatten(-2)
    win_idx = (wst + torch.arange(n_window, device=dev)).expand(B, G, nqb, n_window)
    idx = torch.cat([sink_idx, torch.where(chunk_ok.repeat_interleave(c, -1), sel_idx, 0), win_idx], -1)

    # Pack only the selectable keys [sink, w0) of the chunks: the first chunk may start below the
    # sink (its first `lead` keys are masked) and the last may run into the window, so counting
    # whole chunks would leave gaps between the selected keys, the sink and the window.
    st = torch.where(chunk_ok, starts, 0)
    n_keys = torch.where(chunk_ok, (torch.minimum(st + c, w0) - st.clamp(min=sink)).clamp(0, c), 0)
    lead = torch.where(chunk_ok, (sink - st).clamp(0, c), 0).sum(-1, keepdim=True)
    packed = wst - n_keys.sum(-1, keepdim=True)                        # first selected position
    stream = torch.cat([packed - sink + torch.arange(sink, device=dev),
                        packed - lead + torch.arange(nsel * c, device=dev), win_idx], -1)
    pos = torch.where(geo.exact_attend[:, None, None, None], idx, stream)

    p = geo.q_pos[:, None, :, :, None]                                 # (B, 1, NQB, bq, 1)
    sel_ok = chunk_ok.repeat_interleave(c, -1) & (sel_idx >= sink) & (sel_idx < w0)
    valid = torch.cat([sink_idx[..., None, :] <= p,
                       sel_ok[..., None, :].expand(-1, -1, -1, p.shape[3], -1),
                       win_idx[..., None, :] <= p], -1)
    return idx, pos, valid


def attend(q, k, v, starts, geo: Geometry, config: HiPConfig, rope: RoPE | None, scale: float,
           pages: KVPages | None = None):
    """Block-sparse attention: q (B, Tq, H, D), k/v (B, Tk, K, D), starts (B, G, NQB, NSEL).

    One softmax over sink, selected and window keys, each key counted once. Returns (B, Tq, H, D)
    in q's dtype. pages: read k/v through a block table (k/v are then page pools) or as FP8
    codes with scales (``pages.py``).
    """
    B, tq, H, D = q.shape
    G = starts.shape[1]
    nqb, bq = geo.q_pos.shape[1:]
    idx, pos, valid = slot_indices(starts, geo, config)
    ks, vs = (None, None) if pages is None else (pages.k_scale, pages.v_scale)
    keys, values = gather_kv(k, idx, G, pages, ks), gather_kv(v, idx, G, pages, vs)   # (B, G, NQB, S, KG, D)
    # Slots no real query may attend (past a row's cache_seqlens: whatever the cache holds there)
    # get zero values, as the kernel's masked loads give: a weight of 0 times NaN or inf is NaN.
    seen = (valid & geo.q_valid[:, None, :, :, None]).any(-2)           # (B, G, NQB, S)
    values = values.masked_fill(~seen[..., None, None], 0)
    K = G * keys.shape[-2]
    x = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, nqb * bq - tq)).view(B, nqb, bq, H, D)
    if rope is not None:
        base = geo.p0[..., None]
        qcos, qsin = rope.cos_sin(geo.q_pos - base)                    # (B, NQB, bq, D/2)
        x = apply_rope(x, qcos[..., None, :], qsin[..., None, :])
        kcos, ksin = rope.cos_sin(pos - base[:, None])                 # (B, G, NQB, S, D/2)
        keys = apply_rope(keys, kcos[..., None, :], ksin[..., None, :])
    x = x.view(B, nqb, bq, G, K // G, H // K, D)
    s = torch.einsum("bqtgkjd,bgqskd->bgqkjts", x, keys) * scale
    s = s.masked_fill(~valid[:, :, :, None, None], float("-inf"))
    out = torch.einsum("bgqkjts,bgqskd->bqtgkjd", s.softmax(-1), values)
    return out.reshape(B, nqb * bq, H, D)[:, :tq].to(q.dtype)
