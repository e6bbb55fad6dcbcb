"""The fused decode kernels against the PyTorch reference (on CPU through TRITON_INTERPRET=1),
and how many launches a decode step takes.

Fused: query pooling in one kernel, keep_top writing the next stage's candidates, and attention
that computes its own positions and merges its split-K partials in the same launch.
"""
import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from infinitehip import RoPE, hip_attention
from infinitehip.attention import reference
from infinitehip.attention.api import cache_attention
from infinitehip.attention.mask import NEG_SCORE, SENTINEL, empty_mask, geometry

ops = pytest.importorskip("infinitehip.attention.triton.ops")
decode = pytest.importorskip("infinitehip.attention.triton.decode")

from test_triton import DEVICE, TINY, rand_qkv  # noqa: E402  (the same shapes and devices)


@pytest.mark.parametrize("tq,stride,modes,dtype", [
    (1, 2, ("exact", None), torch.float32),       # decode: one group of one row
    (3, 2, ("relative", None), torch.bfloat16),   # a few decode queries, a half-empty group
    (70, 4, ("auto", 600), torch.float32),        # three query blocks, the last one padded
    (5, 4, ("exact", "no rope"), torch.float32),
])
def test_pool_queries_matches_reference(tq, stride, modes, dtype):
    cfg = TINY.replace(rope_prune=modes[0], model_context_length=modes[1] if isinstance(modes[1], int) else None)
    q, _, _ = rand_qkv(2, tq, 1, 8, 2, 80, dtype)          # D = 80: half-dims padded in the kernel
    kv_len = torch.tensor([700, 590], device=DEVICE)       # "auto": exact in row 1 only
    geo = geometry(kv_len - tq, tq, kv_len, cfg)
    rope = None if modes[1] == "no rope" else RoPE(RoPE.default(80).inv_freq, 1.25)
    want, want_valid = reference.pool_queries(q, geo, stride, rope)
    got, valid = ops.pool_queries(q, geo, stride, rope)
    assert torch.equal(valid, want_valid)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,m,split,dtype", [(37, 8, (32, 8), torch.int32), (300, 128, (4, 2), torch.int64),
                                             (5, 16, (8, 1), torch.int32), (1030, 256, (32, 8), torch.int32)])
def test_keep_top_split_matches_reference(n, m, split, dtype):
    """Selection and the next stage's candidates in one launch; rows shorter than m padded."""
    g = torch.Generator().manual_seed(n)
    starts = (torch.arange(n) * split[0]).expand(3, n).to(dtype).contiguous()
    scores = torch.randn(3, n, generator=g).round(decimals=1)           # many exact ties
    scores[:, :1] = NEG_SCORE
    starts[:, n - n // 4:], scores[:, n - n // 4:] = SENTINEL, NEG_SCORE
    want = reference.keep_top(starts, scores, m, split)
    got = ops.keep_top(starts.to(DEVICE), scores.to(DEVICE), m, split).cpu()
    assert got.dtype == dtype and want.shape == (3, m * split[0] // split[1])
    assert torch.equal(got, want)
    # The sweep's launch overrides and the radix-select variant select the same chunks.
    for tuning in (dict(num_warps=2), dict(num_warps=16), dict(radix=True), dict(radix=False)):
        got = ops.keep_top(starts.to(DEVICE), scores.to(DEVICE), m, split, tuning=tuning).cpu()
        assert torch.equal(got, want), tuning


@pytest.mark.parametrize("m", [1, 7, 64, 200])
def test_keep_top_radix_orders_every_float(m):
    """The radix select over the scores' bytes: signs, +-0.0 ties (the earlier chunk wins),
    -inf, exponents far apart, inactive (NEG_SCORE) entries, every row the reference's choice."""
    g = torch.Generator().manual_seed(m)
    n = 150
    scores = torch.randn(4, n, generator=g) * torch.logspace(-30, 30, n)[torch.randperm(n, generator=g)]
    scores[0, ::3] = 0.0
    scores[0, 1::3] = -0.0
    scores[1, :40] = float("-inf")
    scores[2] = NEG_SCORE                                        # nothing active
    scores[3, 10:20] = scores[3, 9]                              # a run of exact ties
    starts = (torch.arange(n) * 4).expand(4, n).contiguous()
    want = reference.keep_top(starts, scores, m, (4, 2))
    got = ops.keep_top(starts.to(DEVICE), scores.to(DEVICE), m, (4, 2), tuning=dict(radix=True)).cpu()
    assert torch.equal(got, want)


def _reused_setup(B, tq, tk, H, K, D, dtype=torch.float32, lens=None, anchor=True, **overrides):
    cfg = TINY.replace(**overrides)
    q, k, v = rand_qkv(B, tq, tk, H, K, D, dtype, seed=3)
    rope = RoPE.default(D)
    kv_len = torch.full((B,), tk, device=DEVICE) if lens is None else torch.tensor(lens, device=DEVICE)
    _, mask = hip_attention(q, k, v, config=cfg, rope=rope, cache_seqlens=kv_len, backend="reference")
    if anchor:   # the window anchored a few steps back, as between refreshes
        mask.w0 = mask.w0 - torch.arange(B, device=DEVICE)[:, None] * 3 - 2
    else:
        mask = empty_mask(cfg, B, mask.starts.shape[1], 1, DEVICE)     # streaming: no w0
    return cfg, q, k, v, rope, kv_len, mask


@pytest.mark.parametrize("B,tq,tk,H,K,D,lens,anchor,overrides", [
    (2, 1, 700, 8, 2, 64, [700, 433], True, dict(rope_attend="streaming")),
    (1, 16, 600, 8, 2, 64, None, True, dict()),                 # several merge tiles (SPLIT_TILE < NSPLIT)
    (2, 3, 650, 4, 1, 96, [650, 600], False, dict(model_context_length=620)),   # "auto" differs per row
    (1, 20, 600, 4, 2, 64, None, True, dict()),                 # Tq > 16: one program, no split
])
def test_attend_reused_matches_reference(B, tq, tk, H, K, D, lens, anchor, overrides):
    cfg, q, k, v, rope, kv_len, mask = _reused_setup(B, tq, tk, H, K, D, lens=lens, anchor=anchor, **overrides)
    geo = reference.block_geometry(kv_len, tq, cfg, mask)
    want = reference.attend(q, k, v, mask.starts, geo, cfg, rope, D ** -0.5)
    got = ops.attend_reused(q, k, v, mask, None if lens is None else kv_len, cfg, rope, D ** -0.5)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # The merge leaves its counters zeroed, and which split arrives last does not matter.
    assert not decode.arrival_counters(1, q.device).any()
    assert torch.equal(ops.attend_reused(q, k, v, mask, None if lens is None else kv_len, cfg, rope, D ** -0.5), got)


def test_hip_attention_reuse_step_is_attend_reused():
    """refresh_stage = n_stages on the Triton backend takes the one-launch path, same result."""
    cfg, q, k, v, rope, kv_len, mask = _reused_setup(2, 1, 700, 8, 2, 64, torch.bfloat16, lens=[700, 650])
    want, _ = hip_attention(q, k, v, config=cfg, rope=rope, cache_seqlens=kv_len, mask=mask,
                            refresh_stage=cfg.n_stages, backend="reference")
    got, m = hip_attention(q, k, v, config=cfg, rope=rope, cache_seqlens=kv_len, mask=mask,
                           refresh_stage=cfg.n_stages, backend="triton")
    assert m is mask
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- launch counts
FREE = {"view", "_unsafe_view", "slice", "select", "expand", "transpose", "permute", "unsqueeze", "squeeze",
        "t", "as_strided", "alias", "detach", "empty", "empty_like", "empty_strided", "lift_fresh", "reshape"}


class _Launches(TorchDispatchMode):
    """Kernel-level aten ops (composites decomposed, views free) and Triton launches, by name."""

    def __init__(self):
        super().__init__()
        self.names, self.paused = collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
            if func.overloadpacket.__name__ not in FREE and not func.is_view:
                self.names[func.overloadpacket.__name__] += 1
        with _disable_current_modes():
            return func(*args, **kwargs)


@contextlib.contextmanager
def _counting(monkeypatch):
    mode = _Launches()
    from triton.runtime import interpreter
    run = interpreter.InterpretedFunction.run

    def counted(self, *a, **k):
        mode.names["triton:" + self.fn.__name__] += 1
        mode.paused = True   # the interpreter's own tensor traffic is not a launch
        try:
            return run(self, *a, **k)
        finally:
            mode.paused = False

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    with mode:
        yield mode.names


@pytest.mark.skipif(DEVICE == "cuda", reason="counts interpreter launches")
@pytest.mark.parametrize("tq", [1, 16])
def test_decode_launches_per_step(tq, monkeypatch):
    """A step that reuses its mask is one launch; a refresh is geometry + one pooling per
    distinct stride + (score, keep_top) per stage rerun + attention. (Before the fusions:
    reuse 3, refresh from stage 2 / 1 / 0: 32 / 40 / 48 at Tq = 1.)"""
    cfg = TINY.replace(rope_prune="exact")                      # strides (2, 2, 1)
    q, k, v = rand_qkv(1, tq, 900, 8, 2, 64, torch.bfloat16)
    lens, rope = torch.tensor([900], device=DEVICE), RoPE.default(64)
    _, mask = hip_attention(q, k, v, config=cfg, rope=rope, cache_seqlens=lens, backend="triton")
    for stage in range(cfg.n_stages + 1):   # as the engine calls it (hip_attention also checks CPU lengths)
        step = lambda: cache_attention(q, k, v, config=cfg, rope=rope, cache_seqlens=lens, mask=mask,  # noqa: E731
                                       refresh_stage=stage, backend="triton")
        step()   # cached constants made
        with _counting(monkeypatch) as names:
            step()
        reruns = cfg.n_stages - stage
        pooled = len({s if tq > 1 else 1 for s in cfg.stage_strides[stage:]})   # one query: pooled once
        want = 1 if reruns == 0 else 1 + pooled + 2 * reruns + 1
        assert sum(names.values()) == want, (stage, dict(names))
