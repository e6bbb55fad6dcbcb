"""``hip_attention``'s input checks: errors that say what was wrong and what to pass instead.

Checked on the host where that costs no sync of a decode step (shapes, dtypes, types, CPU
tensors' values); a CUDA step's values are trusted, as a graph must not wait for the host.
"""
from __future__ import annotations

import math

import torch

from ..config import HiPConfig
from .mask import HiPMask, window_slots
from .rope import RoPE
from .stages import n_groups

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_reuse_span(q: torch.Tensor, kv_len: torch.Tensor, mask: HiPMask, config: HiPConfig, row_stage):
    """A reused mask keeps the window anchored where stage 0 last pruned (``mask.w0``) in a fixed
    number of slots (``window_slots``), enough for refresh_intervals[0] + refresh_lag - 1 tokens
    past that step. Queries further on would push the window over keys that are neither in it nor
    selectable (found with 4 queries a call: 0.013-0.033 off dense at full budget, silently), so
    that is an error. Checked by the public call where it costs no host sync of a decode step:
    CPU tensors, or more than one query a call. The engine (``cache_attention``) keeps to its
    schedule and is not checked: a row parked while its slot prefills runs throwaway steps."""
    if mask.w0 is None or torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    tq, bq = q.shape[1], config.block_size_q
    nqb = -(-tq // bq)
    if mask.w0.shape != (q.shape[0], nqb):
        return   # a mask of other query blocks: the attention's own checks speak
    p0 = (kv_len.to(q.device, torch.long) - tq)[:, None] + torch.arange(nqb, device=q.device) * bq   # (B, NQB)
    w0 = mask.w0.to(p0)
    lost = p0 + bq - window_slots(config) > w0.clamp(min=config.sink)     # keys in [w0, that) would drop
    if row_stage is not None:
        lost &= row_stage.to(q.device)[:, None] > 0
    if bool(lost.any()):
        b, j = (int(i) for i in lost.nonzero()[0])
        span = int(p0[b, j] - w0[b, j]) - config.window + 1
        limit = config.refresh_intervals[0] + config.refresh_lag - 1
        raise ValueError(f"mask reuse would drop keys: row {b}'s queries start {span} positions after the call that "
                         f"last ran stage 0, and a reused mask keeps every key for at most refresh_intervals[0] + "
                         f"refresh_lag - 1 = {limit} (its window slots); rerun stage 0 (refresh_stage=0) sooner: with "
                         f"{tq} queries a call, reuse a mask for at most {limit // tq} calls after the one that pruned it")


def check_lengths(cache_seqlens: torch.Tensor, tq: int, tk: int):
    """Each row's valid keys hold its Tq queries and fit the Tk slots. Checked where that costs no
    host sync (a CPU tensor); on the GPU the values are trusted, as a decode step's CUDA graph
    must not wait for the host."""
    if not is_integer(cache_seqlens) or cache_seqlens.dim() != 1:
        return   # _check names the shape and dtype
    lens = cache_seqlens.long()   # a narrow dtype (uint8) would wrap Tk in the comparison
    if not bool(((lens >= tq) & (lens <= tk)).all()):
        raise ValueError(f"cache_seqlens={cache_seqlens.tolist()} must each be in [Tq, Tk] = [{tq}, {tk}]: "
                         "the valid keys of each row, which include its Tq queries")


def is_integer(t: torch.Tensor) -> bool:
    """An integer dtype: not floating, complex or bool (a bool mask passed as lengths silently
    meant rows of 0 or 1 keys)."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_scale(scale) -> float:
    """The softmax scale as a float: a finite positive number (NaN gave NaN outputs silently)."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.is_floating_point():
        scale = scale.item()   # a 0-d tensor, like numpy's scalars below, is a number
    try:
        number = not isinstance(scale, (bool, str)) and float(scale) == scale
    except (TypeError, ValueError):
        number = False
    if not number or not 0 < float(scale) < math.inf:
        raise ValueError(f"scale={scale!r} must be a finite number > 0 (None: 1 / sqrt(head_dim))")
    return float(scale)


def check_inputs(q, k, v, config, rope, cache_seqlens, mask) -> None:
    """Validate ``hip_attention``'s inputs with errors that say what to change."""
    if not isinstance(config, HiPConfig):
        raise TypeError(f"config must be a HiPConfig, got {type(config).__name__}; try HiPConfig.preset('paper')")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, T, heads, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, tq, H, D = q.shape
    _, tk, K, Dk = k.shape
    if 0 in (B, H, D, K):
        raise ValueError(f"empty input: q {tuple(q.shape)}, k/v {tuple(k.shape)}; every dimension must be >= 1")
    if k.shape[0] != B:
        raise ValueError(f"q has batch {B} but k/v have batch {k.shape[0]}")
    if Dk != D:
        raise ValueError(f"q has head_dim {D} but k/v have head_dim {Dk}")
    if D % 2 or D > 256:
        raise ValueError(f"head_dim {D} is not supported: it must be even and at most 256")
    if K == 0 or H % K:
        raise ValueError(f"{H} query heads are not a multiple of {K} kv heads; GQA needs H % K == 0")
    if tq == 0 or tk == 0:
        raise ValueError(f"empty input: Tq={tq}, Tk={tk}")
    if tq > tk:
        raise ValueError(f"Tq={tq} queries but only Tk={tk} keys: queries are the last Tq key positions")
    if rope is not None and not isinstance(rope, RoPE):   # rope="x": an AttributeError on .head_dim
        raise TypeError(f"rope must be a RoPE (e.g. RoPE.default(head_dim)) or None, got {type(rope).__name__}")
    if rope is not None and rope.head_dim != D:
        raise ValueError(f"rope is for head_dim {rope.head_dim}, inputs have head_dim {D}")
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (B,) or not is_integer(cache_seqlens):
            got = (f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}" if isinstance(cache_seqlens, torch.Tensor)
                   else type(cache_seqlens).__name__)
            raise ValueError(f"cache_seqlens must be an integer tensor of shape ({B},), got {got}")
    if mask is not None:
        if not isinstance(mask, HiPMask):
            raise TypeError(f"mask must be the HiPMask a previous call returned, got {type(mask).__name__}")
        G = n_groups(config, K)
        nqb = -(-tq // config.block_size_q)
        widths = [config.n_selected] + [config.n_kept(s - 1) * config.chunk_sizes[s - 1] // config.chunk_sizes[s]
                                        for s in range(1, config.n_stages)]
        shapes = [tuple(mask.starts.shape)] + [None if t is None else tuple(t.shape) for t in mask.stage_inputs[1:]]
        if len(mask.stage_inputs) != config.n_stages or any(
                shape is not None and shape != (B, G, nqb, n) for shape, n in zip(shapes, widths)):
            raise ValueError(f"mask has shape {shapes[0]} and stage inputs {shapes[1:]}, expected ({B}, {G}, {nqb}, "
                             f"{widths[0]}) and widths {widths[1:]} for this config and input: a mask is reusable "
                             "only with the config and input shapes of the call that returned it")
