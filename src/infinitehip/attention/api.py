"""``hip_attention``: the one public attention call. Checks inputs, then picks the backend."""
from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..config import HiPConfig
from .triton import interpreted as triton_interpreted
from . import reference
from .checks import check_inputs, check_lengths, check_reuse_span, check_scale
from .mask import HiPMask, anchor_window, geometry
from .rope import RoPE, apply_rope
from .stages import run_stages

KERNELS = ("auto", "triton", "reference")   # hip_attention's backend: which code runs it
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# The reference materializes (B, H, queries, attended keys) scores: bound that per slice.
_REFERENCE_SLICE_ELEMENTS = 1 << 26


class RowStages(NamedTuple):
    """Per-row refresh stages already on the device, for ``refresh_stage``: a CUDA graph's static
    buffer, refilled before each replay (a list would be copied at capture and baked in).
    ``first``, their minimum, is known on the host: the stage the batch runs pruning from."""

    first: int
    rows: torch.Tensor    # (B,) int64 on the device, each in [first, n_stages]


def hip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, config: HiPConfig | None = None,
                  rope: RoPE | None = None, scale: float | None = None,
                  cache_seqlens: torch.Tensor | None = None, mask: HiPMask | None = None,
                  refresh_stage: int | Sequence[int] = 0, backend: str = "auto") -> tuple[torch.Tensor, HiPMask | None]:
    """Causal InfiniteHiP attention of the queries ``q`` over the keys ``k`` and values ``v``.

    Args:
        q: (B, Tq, H, D) queries, **without** RoPE. They are the last Tq positions of the keys:
            query t of batch b sits at position ``kv_len[b] - Tq + t``.
        k, v: (B, Tk, K, D) keys (without RoPE) and values; H must be a multiple of K (GQA).
            float16, bfloat16 or float32, all three alike; D even and <= 256.
        config: pruning / attention settings (default: the ``paper`` preset).
        rope: the model's rotary embedding, applied inside at positions chosen by adaptive RoPE;
            None applies no rotation.
        scale: softmax scale, default 1 / sqrt(D).
        cache_seqlens: (B,) int, the number of valid keys per batch row when k/v are a cache
            of fixed capacity Tk (default: all Tk). Slots past it must hold finite values (a
            zeroed cache): dense attention (short contexts) weighs them by 0, and 0 x NaN is NaN.
            Causality is relative to it::

                Tq = 2, kv_len = 5:   keys 0 1 2 3 4
                            query 0:       1 1 1 1 0
                            query 1:       1 1 1 1 1
        mask: the mask a previous call returned, to reuse in decode (see ``refresh_stage``).
        refresh_stage: the first pruning stage to rerun (``config.refresh_stage(step)``):
            0 prunes from scratch, ``config.n_stages`` reuses ``mask`` as it is. A sequence of
            B ints gives each batch row its own (rows decoding at different steps); each row
            then gets exactly the mask a call of its own would give. Without a mask (None: the
            first step, or the previous call was dense) every stage runs. A reused mask covers
            queries up to ``refresh_intervals[0] + refresh_lag - 1`` positions past the call that
            last ran stage 0 (``config.refresh_stage(step)`` keeps to it at one query a call;
            with more, rerun stage 0 sooner): further is an error where it can be checked
            without a host sync (CPU tensors, or Tq > 1), since keys would drop silently.
        backend: "triton" (CUDA), "reference" (PyTorch, any device), or "auto".

    Returns:
        (out, mask): out (B, Tq, H, D) in q's dtype; mask the HiPMask used, or None when the
        context is short enough that attention was dense (then every key was attended).
    """
    return cache_attention(q, k, v, config=config, rope=rope, scale=scale, cache_seqlens=cache_seqlens, mask=mask,
                           refresh_stage=refresh_stage, backend=backend, check_values=True)


def cache_attention(q, k, v, *, config=None, rope=None, scale=None, cache_seqlens=None, mask=None, refresh_stage=0,
                    backend="auto", check_values=False):
    """``hip_attention`` over a KV cache the engine fills (``KVCache.attention``): the same call,
    trusting ``cache_seqlens``' values, which a decode step must not read on the host (the CPU
    path is the GPU step's model, with no host sync either). ``check_values``: ``hip_attention``'s
    checks of values where they cost no such sync (``_check_values``)."""
    config = HiPConfig() if config is None else config   # not `or`: {} silently meant the default
    backend = _check(q, k, v, config, rope, cache_seqlens, mask, backend)
    q, k, v = _unit_head_dim(backend, q, k, v)
    from_stage, row_stage = _refresh_rows(refresh_stage, q.shape[0], config, mask, q.device)
    B, tq, _, D = q.shape
    tk = k.shape[1]
    if check_values:
        _check_values(q, tk, cache_seqlens, mask, config, from_stage, row_stage)
    scale = 1.0 / math.sqrt(D) if scale is None else check_scale(scale)
    if _use_dense(tk, config):
        lens = None if cache_seqlens is None else cache_seqlens.to(device=q.device, dtype=torch.long)
        return dense_attention(q, k, v, lens, rope, scale), None
    if reuses_in_one_launch(backend, from_stage, tq, config):
        from .triton import ops
        return ops.attend_reused(q, k, v, mask, cache_seqlens, config, rope, scale), mask
    impl = implementation(backend)
    return prune_and_attend(q, k, _kv_len(cache_seqlens, B, tk, q.device), config, rope, mask, from_stage, row_stage,
                            backend, impl.score_chunks,
                            lambda qs, m, geo: impl.attend(qs, k, v, m.starts, geo, config, rope, scale))


def cache_prune(q, k, *, config=None, rope=None, cache_seqlens=None, mask=None, refresh_stage=0, backend="auto",
                programs: int | None = None):
    """The pruning half of ``cache_attention``: the mask that call would attend with (None where
    it would attend densely), without attending. A decode step with ``HiPConfig.refresh_lag``
    prunes with this and attends with the mask it pruned ``refresh_lag`` steps earlier.
    programs: at most this many programs per scoring launch (Triton; the same scores), so that
    pruning beside decode leaves the SMs room for decode's kernels."""
    config = HiPConfig() if config is None else config   # not `or`: {} silently meant the default
    backend = _check(q, k, k, config, rope, cache_seqlens, mask, backend)
    q, k = _unit_head_dim(backend, q, k)
    return prune_only(q, k, config, rope, cache_seqlens, mask, refresh_stage, backend, programs)


def prune_only(q, k, config: HiPConfig, rope, cache_seqlens, mask, refresh_stage, backend: str,
               programs: int | None = None, pages=None) -> HiPMask | None:
    """``cache_prune`` past its input checks; ``pages``: an offloaded cache's FP8 scales or probe
    copy (``paged.paged_prune``, whose k may be FP8 codes)."""
    from_stage, row_stage = _refresh_rows(refresh_stage, q.shape[0], config, mask, q.device)
    if _use_dense(k.shape[1], config):
        return None
    backend = resolve_backend(backend, q)
    kv_len = _kv_len(cache_seqlens, q.shape[0], k.shape[1], q.device)
    score = functools.partial(implementation(backend).score_chunks, pages=pages)
    if programs and backend == "triton":
        score = functools.partial(score, tuning={"max_programs": programs})
    return prune_and_attend(q, k, kv_len, config, rope, mask, from_stage, row_stage, backend, score, None)[1]


def _check_values(q, tk: int, cache_seqlens, mask, config: HiPConfig, from_stage: int, row_stage):
    """The public call's checks of values, where they cost no host sync of a CUDA decode step:
    CPU lengths, and a reused mask's span (CPU tensors, or more than one query a call)."""
    if isinstance(cache_seqlens, torch.Tensor) and not cache_seqlens.is_cuda:
        check_lengths(cache_seqlens, q.shape[1], tk)
    reuse = mask is not None and (from_stage > 0 or row_stage is not None)
    if reuse and (q.shape[1] > 1 or not q.is_cuda) and not _use_dense(tk, config):
        check_reuse_span(q, _kv_len(cache_seqlens, q.shape[0], tk, q.device), mask, config, row_stage)


def _unit_head_dim(backend: str, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The Triton kernels read head_dim with unit stride; a view strided along it (rare: the
    reference and SDPA take it as is) is copied rather than refused from inside a kernel."""
    if backend != "triton":
        return xs
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def _kv_len(cache_seqlens: torch.Tensor | None, B: int, tk: int, device) -> torch.Tensor:
    """(B,) int64 valid keys per row: ``cache_seqlens``, or all Tk."""
    if cache_seqlens is None:
        return _constant(_all_keys, B, tk, device=torch.device(device))
    return cache_seqlens.to(device=device, dtype=torch.long)


def _constant(make, *key, device: torch.device) -> torch.Tensor:
    """``make(*key, device)``, an lru_cache'd read-only constant; made fresh during CUDA graph
    capture, where a tensor made now would hold garbage until the first replay."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return make.__wrapped__(*key, device)
    return make(*key, device)


@functools.lru_cache(maxsize=64)
def _all_keys(B: int, tk: int, device: torch.device) -> torch.Tensor:
    """All Tk keys for each of B rows: filling it was a launch of its own in every call that
    prunes, ~2 us of a refresh step in a CUDA graph (H200, 128K keys)."""
    return torch.full((B,), tk, device=device, dtype=torch.long)


def reuses_in_one_launch(backend: str, from_stage: int, tq: int, config: HiPConfig) -> bool:
    """A decode step that reuses its mask on the Triton backend: one launch (``ops.attend_reused``),
    attention computing its own positions, instead of geometry + attention."""
    return backend == "triton" and from_stage == config.n_stages and tq <= config.block_size_q


def implementation(backend: str):
    """The module with ``pool_queries``, ``score_chunks``, ``keep_top``, ``block_geometry`` and
    ``attend`` for a resolved backend name."""
    if backend == "triton":
        from .triton import ops

        return ops
    return reference


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``"auto"`` -> Triton for CUDA tensors when Triton is available, else the reference."""
    if backend not in KERNELS:
        raise ValueError(f"backend={backend!r}; choose one of {KERNELS}")
    if backend == "auto":
        from .triton import available
        return "triton" if q.is_cuda and available() else "reference"
    return backend


def prune_and_attend(q, k, kv_len, config, rope, mask, from_stage: int, row_stage, backend: str, score_chunks,
                     attend) -> tuple[torch.Tensor | None, HiPMask]:
    """Prune (rerun from ``from_stage``), then ``attend(queries, mask, geometry)`` (None: prune
    only, the output is None). The Triton backend takes every query at once; the reference a few
    query blocks per slice, so its memory stays bounded on long prompts."""
    tq, bq = q.shape[1], config.block_size_q
    step = tq if backend == "triton" else _reference_slice(q, k.shape[1], k.shape[2], config)
    impl = implementation(backend)
    anchor = mask is not None and (from_stage > 0 or row_stage is not None)   # reuse: keep the window
    rows = None if row_stage is None else row_stage > 0
    outs, masks = [], []
    for t in range(0, tq, step):
        qs = q[:, t:t + step]
        m = mask if mask is None or step >= tq else _slice_mask(mask, t // bq, -(-qs.shape[1] // bq))
        if step >= tq and tq <= bq:   # one query block (decode): one launch on the Triton backend
            geo = impl.block_geometry(kv_len, tq, config, m if anchor else None, rows)
        else:
            geo = geometry(kv_len - (tq - t), qs.shape[1], kv_len, config)
            geo = anchor_window(geo, m, config, rows) if anchor else geo
        if from_stage < config.n_stages:
            m = run_stages(qs, k, geo, config, rope, score_chunks, m, from_stage, row_stage, impl.keep_top,
                           impl.pool_queries)
        outs.append(None if attend is None else attend(qs, m, geo))
        masks.append(m)
    if len(masks) == 1:
        return outs[0], masks[0]
    return None if attend is None else torch.cat(outs, dim=1), HiPMask.cat_query_blocks(masks)


def _refresh_rows(refresh_stage, B: int, config: HiPConfig, mask: HiPMask | None, device):
    """``refresh_stage`` (an int, or one per row) -> (first stage any row reruns, (B,) per-row
    stages or None when all rows agree). With no mask to reuse, everything reruns: a decode loop
    passes back what the previous call returned, None while the context was short enough for
    dense attention."""
    if isinstance(refresh_stage, RowStages):
        return _device_rows(refresh_stage, B, config, mask, device)
    given = refresh_stage if isinstance(refresh_stage, (list, tuple)) else [refresh_stage]
    if any(isinstance(r, bool) for r in given):   # True passed as stage 1
        raise ValueError(f"refresh_stage={refresh_stage!r}: a stage number (config.refresh_stage(step)), not a bool")
    try:
        try:
            rows = [operator.index(refresh_stage)]
        except TypeError:
            rows = [operator.index(r) for r in refresh_stage]
    except TypeError:
        raise ValueError(f"refresh_stage={refresh_stage!r} must be an int (config.refresh_stage(step)) or a "
                         "sequence of one int per batch row") from None
    if len(rows) not in (1, B):
        raise ValueError(f"refresh_stage has {len(rows)} entries for a batch of {B}: give an int or one per row")
    if not all(0 <= r <= config.n_stages for r in rows):
        raise ValueError(f"refresh_stage={refresh_stage} must be in [0, {config.n_stages}] (per row)")
    if mask is None:   # nothing to reuse (a first step, or the previous call attended densely)
        return 0, None
    _check_saved_inputs(mask, min(rows), max(rows), config, refresh_stage)
    if len(set(rows)) == 1:
        return rows[0], None
    return min(rows), _constant(_row_stages, tuple(rows), device=torch.device(device))


def _device_rows(given: RowStages, B: int, config: HiPConfig, mask: HiPMask | None, device):
    """``_refresh_rows`` of stages already on the device: their values are not read (a host sync)."""
    first, rows = given
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= config.n_stages:
        raise ValueError(f"RowStages.first={first!r} must be a stage in [0, {config.n_stages}]")
    if not isinstance(rows, torch.Tensor) or rows.shape != (B,) or rows.dtype != torch.long:
        raise ValueError(f"RowStages.rows must be a ({B},) int64 tensor of per-row stages, got "
                         f"{getattr(rows, 'shape', rows)!r}")
    if rows.device.type != torch.device(device).type:   # else a device mismatch deep in the pruning
        raise ValueError(f"RowStages.rows is on {rows.device}, the queries on {device}: put it on theirs")
    if mask is None:
        return 0, None
    _check_saved_inputs(mask, first, config.n_stages, config, given)
    return first, rows


def _check_saved_inputs(mask: HiPMask, lo: int, hi: int, config: HiPConfig, refresh_stage):
    """Rerunning stages lo..hi needs the mask's saved input of each (an empty_mask has none)."""
    missing = [s for s in range(max(lo, 1), min(hi, config.n_stages - 1) + 1) if mask.stage_inputs[s] is None]
    if missing:
        raise ValueError(f"refresh_stage={refresh_stage} reruns stage {missing[0]}, but the mask has no saved input "
                         f"for it (an empty_mask): reuse it with refresh_stage={config.n_stages} or prune from 0")


@functools.lru_cache(maxsize=256)
def _row_stages(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B,) int64 per-row stages on ``device``: a batch whose rows are at
    different refresh phases passes the same few patterns again and again, and each
    ``torch.tensor`` from a Python list to the GPU was a copy that waited for the GPU to drain,
    in every layer of such a step (H200, 8 layers, 4 rows at staggered phases, eager: 6.5 ->
    6.25 ms a step)."""
    return torch.tensor(rows, device=device)


def dense_attention(q, k, v, kv_len: torch.Tensor | None, rope: RoPE | None, scale: float) -> torch.Tensor:
    """Exact causal attention with RoPE at true positions (SDPA). Returns (B, Tq, H, D).

    kv_len: (B,) valid keys per row, or None when every row has all Tk keys — then SDPA gets no
    explicit mask and can use its fastest (flash / cuDNN) kernels.
    """
    B, tq, H, D = q.shape
    tk = k.shape[1]
    lens = torch.full((B,), tk, device=q.device) if kv_len is None else kv_len
    q_pos = lens[:, None] - tq + torch.arange(tq, device=q.device)          # (B, Tq)
    if rope is not None:
        cos, sin = rope.cos_sin(q_pos)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        cos, sin = rope.cos_sin(torch.arange(tk, device=q.device))
        k = apply_rope(k, cos[:, None], sin[:, None])
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # (B, heads, T, D)
    if kv_len is None and tq == 1:
        # Decode: the query heads of one KV head become the rows of one query block, so SDPA
        # reads the cache in place with its flash kernels (no GQA expansion, no copy).
        # Not cuDNN: its plans are built per shape, and decode's key count changes every step.
        K = k.shape[1]
        with sdpa_kernel(_DECODE_BACKENDS):
            out = F.scaled_dot_product_attention(q.reshape(B, K, H // K, D), k, v, scale=scale).reshape(B, H, 1, D)
    elif kv_len is None:  # prefill: causal aligned bottom-right, flash / cuDNN eligible (heads-first copies)
        mask = None if tq == tk else causal_lower_right(tq, tk)
        k, v = k.contiguous(), v.contiguous()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=tq == tk, scale=scale, enable_gqa=True)
    else:
        allowed = torch.arange(tk, device=q.device) <= q_pos[..., None]       # (B, Tq, Tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def _use_dense(tk: int, config: HiPConfig) -> bool:
    """Dense when sparse attention would attend everything, or below the measured crossover."""
    return tk <= config.dense_cutoff


def _reference_slice(q: torch.Tensor, tk: int, kv_heads: int, config: HiPConfig) -> int:
    """Queries per slice of the reference path: it materializes (B, H, queries, attended keys)
    scores and stage-0 probes, so bound those to ``_REFERENCE_SLICE_ELEMENTS`` per slice."""
    B, _, H, D = q.shape
    bq = config.block_size_q
    attended = config.sink + config.budget + config.window + bq
    probes = 2 * -(-tk // config.chunk_sizes[0])                         # stage-0 probes per level
    per_block = B * max(H * bq * attended, probes * (H * bq // config.stage_strides[0] + kv_heads * D))
    return max(1, _REFERENCE_SLICE_ELEMENTS // per_block) * bq


def _slice_mask(mask: HiPMask, first: int, n: int) -> HiPMask:
    return mask.query_blocks(slice(first, first + n))


def _check(q, k, v, config, rope, cache_seqlens, mask, backend) -> str:
    """Validate the inputs with errors that say what to change; return the backend to use."""
    check_inputs(q, k, v, config, rope, cache_seqlens, mask)
    backend = resolve_backend(backend, q)
    if backend == "triton" and not q.is_cuda and not triton_interpreted():
        raise ValueError(f"backend='triton' runs on CUDA tensors, these are on {q.device}; use backend='reference' "
                         "(or 'auto')")
    return backend
