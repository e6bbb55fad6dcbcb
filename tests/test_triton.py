"""The Triton kernels against the PyTorch reference (on CPU through TRITON_INTERPRET=1).

score_chunks and attend are compared given the same inputs and the same mask; tolerances of
low-precision runs are relative to the reference's own low-precision error, as in
flash-attention's tests.
"""
import pytest
import torch

from infinitehip import HiPConfig, RoPE, hip_attention
from infinitehip.attention import reference
from infinitehip.attention.mask import NEG_SCORE, SENTINEL, geometry
from infinitehip.attention.reference import pool_queries
from infinitehip.attention.stages import first_stage_starts, run_stages

ops = pytest.importorskip("infinitehip.attention.triton.ops")
MAX_ROW = pytest.importorskip("infinitehip.attention.triton.select").MAX_ROW

TINY = HiPConfig.preset("tiny")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand_qkv(B, tq, tk, H, K, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, t, n, D, generator=g) for t, n in ((tq, H), (tk, K), (tk, K)))
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def setup(B, tq, tk, H, K, D, *, dtype=torch.float32, lens=None, seed=0, **overrides):
    cfg = TINY.replace(**overrides)
    q, k, v = rand_qkv(B, tq, tk, H, K, D, dtype, seed)
    kv_len = torch.full((B,), tk, device=DEVICE) if lens is None else torch.tensor(lens, device=DEVICE)
    geo = geometry(kv_len - tq, tq, kv_len, cfg)
    return cfg, q, k, v, geo, RoPE.default(D)


# (B, Tq, Tk, H, K, D, lens): ragged Tk, GQA 1/4/8, several query blocks, cache_seqlens.
SCORE_CASES = [
    (1, 40, 517, 4, 4, 64, None),        # GQA 1, ragged, two query blocks
    (2, 1, 700, 8, 2, 128, [700, 555]),  # decode, GQA 4, cache_seqlens
    (1, 3, 450, 8, 1, 80, None),         # GQA 8, head_dim 80 (half-dim padded to 64)
]


@pytest.mark.parametrize("B,tq,tk,H,K,D,lens", SCORE_CASES)
@pytest.mark.parametrize("sharing,prune", [("kv", "exact"), ("all", "relative")])
def test_score_chunks_matches_reference(B, tq, tk, H, K, D, lens, sharing, prune):
    cfg, q, k, _, geo, rope = setup(B, tq, tk, H, K, D, lens=lens, head_sharing=sharing, rope_prune=prune)
    mask = run_stages(q, k, geo, cfg, rope, reference.score_chunks)
    for s in (0, cfg.n_stages - 1):           # the whole context, then the finest chunks
        qp, q_valid = pool_queries(q, geo, cfg.stage_strides[s], rope)
        starts = (first_stage_starts(tk, cfg.chunk_sizes[0], *mask.starts.shape[:3], k.device) if s == 0
                  else mask.stage_inputs[s].long())
        want = reference.score_chunks(qp, q_valid, k, starts, cfg.chunk_sizes[s], geo, cfg, rope)
        got = ops.score_chunks(qp, q_valid, k, starts, cfg.chunk_sizes[s], geo, cfg, rope)
        assert (want > -1e29).any(), "some chunks must be active for the test to mean anything"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # Fewer programs than tiles (pruning beside decode), each looping over its share: the same bits.
        capped = ops.score_chunks(qp, q_valid, k, starts, cfg.chunk_sizes[s], geo, cfg, rope,
                                  tuning=dict(max_programs=3))
        assert torch.equal(capped, got)
        if s == 0:   # the descent stopped early (stage0_levels): the same capped scores
            want2 = reference.score_chunks(qp, q_valid, k, starts, cfg.chunk_sizes[s], geo, cfg, rope, levels=2)
            got2 = ops.score_chunks(qp, q_valid, k, starts, cfg.chunk_sizes[s], geo, cfg, rope, levels=2)
            torch.testing.assert_close(got2, want2, rtol=1e-4, atol=1e-4)
            assert not torch.equal(want2, want), "stopping early must change some scores"


@pytest.mark.parametrize("rows,n,m", [(3, 37, 8), (2, 300, 128), (4, 64, 64), (5, 16, 32), (1, 1, 4), (2, 37, 1),
                                      (1, MAX_ROW, 64), (1, 2 * MAX_ROW + 5, 64)])   # the longest kernel row; torch
def test_keep_top_matches_reference(rows, n, m):
    """Top-m selection in position order: inactive chunks never kept, ties to the earlier chunk,
    rows shorter than m padded."""
    g = torch.Generator().manual_seed(n)
    starts = (torch.arange(n) * 8).expand(rows, n).clone()
    scores = torch.randn(rows, n, generator=g).round(decimals=1)       # many exact ties
    scores[:, :1] = NEG_SCORE                                            # inside the sink
    starts[:, n - n // 4:], scores[:, n - n // 4:] = SENTINEL, NEG_SCORE  # no chunk
    want = reference.keep_top(starts, scores, m)
    got = ops.keep_top(starts.to(DEVICE), scores.to(DEVICE), m).cpu()
    assert torch.equal(got, want)
    assert want.shape == (rows, m) and (want[:, :-1] <= want[:, 1:]).all()
    assert (want == SENTINEL).sum() >= rows * max(m - (n - n // 4 - 1), 0)


@pytest.mark.parametrize("spread", ["normal", "ties", "close"])
def test_radix_selection_settles_early_and_exactly(spread):
    """The radix select stops once the candidates left are all taken or none is: the same chunks
    as the reference whether that happens after the first byte (ties: rounded scores), the second
    or third (normal), or only at the last (scores sharing their high bytes: 1 + tiny steps)."""
    g = torch.Generator().manual_seed(7)
    rows, n, m = 6, 1024, 256
    scores = torch.randn(rows, n, generator=g)
    if spread == "ties":
        scores = scores.round(decimals=0)
    elif spread == "close":
        scores = 1.0 + torch.randint(0, 64, (rows, n), generator=g).float() * 2.0 ** -23
    starts = (torch.arange(n) * 8).expand(rows, n).clone()
    want = reference.keep_top(starts, scores, m, (8, 2))
    got = ops.keep_top(starts.to(DEVICE), scores.to(DEVICE), m, (8, 2), tuning=dict(radix=True)).cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize("tq,modes,context,anchor", [(1, ("auto", "auto"), 600, False), (3, ("relative", "exact"), None, True),
                                                      (1, ("exact", "streaming"), None, "rows"), (TINY.block_size_q, ("auto", "auto"), 650, True)])
def test_block_geometry_matches_reference(tq, modes, context, anchor):
    cfg = TINY.replace(rope_prune=modes[0], rope_attend=modes[1], model_context_length=context)
    kv_len = torch.tensor([700, 555, 600], device=DEVICE)
    mask = rows = None
    if anchor:
        mask = reference.block_geometry(kv_len - 5, tq, cfg)   # any HiPMask-like holder of w0 (B, 1)
        mask.w0 = mask.w0 - torch.tensor([[3], [0], [40]], device=DEVICE)
        rows = torch.tensor([True, False, True], device=DEVICE) if anchor == "rows" else None
    want = reference.block_geometry(kv_len, tq, cfg, mask, rows)
    got = ops.block_geometry(kv_len, tq, cfg, mask, rows)
    for field in ("p0", "w0", "q_pos", "q_valid", "exact_prune", "exact_attend"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    if anchor:
        assert not torch.equal(want.w0, (kv_len - tq - cfg.window + 1)[:, None]), "the anchor must matter"


def test_score_chunks_bf16_keys_and_inactive_chunks():
    cfg, q, k, _, geo, rope = setup(1, 1, 400, 4, 2, 64, dtype=torch.bfloat16)
    qp, q_valid = pool_queries(q, geo, 2, rope)
    # Chunks inside the window, past the end, or SENTINEL must score NEG_SCORE.
    starts = torch.tensor([0, 32, 64, 256, 352, 384, SENTINEL], device=DEVICE).expand(1, 2, 1, -1)
    want = reference.score_chunks(qp, q_valid, k, starts, 32, geo, cfg, rope)
    # bfloat16 keys are scored with bfloat16 operands: pooled queries and rotated probes rounded
    # to 8 mantissa bits (2^-9 relative each), float32 sums; tf32 (the tuning option): 11 bits.
    for tuning, tol in ((None, 2e-2), (dict(precision="tf32"), 2e-3),
                        (dict(q16=True), 2e-2)):                  # pooled queries stored in bfloat16
        got = ops.score_chunks(qp, q_valid, k, starts, 32, geo, cfg, rope, tuning=tuning)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert (got[..., 4:] == -1.0e30).all() and (got[..., 1:4] > -1e29).all()


def test_score_chunks_launch_defaults():
    """bfloat16 pooled queries (q16) and 32-row tiles for prefill's pooled stages, 64 chunks a
    program for its 256-row last stage; decode (one query block) and float32 operands keep float32
    pooled queries (no cast launch in a refresh)."""
    from infinitehip.attention.triton.prune import _launch_defaults
    assert _launch_defaults(64, 4096, "bf16", True) == dict(q16=True, block_m=32, block_c=32, num_warps=4)
    assert _launch_defaults(256, 1024, "bf16", True) == dict(q16=True, block_m=64, block_c=64, num_warps=4)
    assert _launch_defaults(4, 4096, "bf16", False) == dict(q16=False, block_m=16, block_c=32, num_warps=4)
    assert _launch_defaults(32, 4096, "bf16", False) == dict(q16=False, block_m=32, block_c=32, num_warps=4)
    assert _launch_defaults(64, 4096, "tf32", True) == dict(q16=False, block_m=64, block_c=32, num_warps=4)
    assert _launch_defaults(256, 1024, "tf32x3", True) == dict(q16=False, block_m=64, block_c=64, num_warps=4)
    cfg, q, k, _, geo, rope = setup(1, 1, 400, 4, 2, 64, dtype=torch.bfloat16)
    qp, q_valid = pool_queries(q, geo, 2, rope)
    starts = torch.tensor([0, 32, 64], device=DEVICE).expand(1, 2, 1, -1)
    with pytest.raises(ValueError, match="q16"):
        ops.score_chunks(qp, q_valid, k, starts, 32, geo, cfg, rope, tuning=dict(q16=True, precision="tf32"))
    if DEVICE == "cuda":   # both round the pooled queries to nearest bfloat16: the same scores
        a, b = (ops.score_chunks(qp, q_valid, k, starts, 32, geo, cfg, rope, tuning=dict(q16=x, block_m=32))
                for x in (True, False))
        assert torch.equal(a, b)


def _rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


RUN8 = dict(chunk_sizes=(32, 8), stage_budgets=(None, 256), stage_strides=(2, 1), refresh_intervals=(8, 4))

# (B, Tq, Tk, H, K, D, lens, overrides)
ATTEND_CASES = [
    (1, 70, 517, 4, 4, 64, None, dict(rope_attend="exact")),                  # 3 query blocks, GQA 1
    (2, 1, 700, 8, 2, 128, [700, 433], dict(rope_attend="streaming")),        # decode split-K
    (1, 3, 450, 8, 1, 96, None, dict(head_sharing="all")),                    # GQA 8, d 96
    (1, 40, 170, 4, 1, 64, None, dict()),                                     # Tk just above sink+window
    (1, 20, 100, 4, 2, 64, None, dict()),                                     # Tk < sink+window
    # 8-token chunks (the paper's), exact and streaming positions
    (2, 1, 900, 8, 2, 64, [900, 611], dict(RUN8, rope_attend="streaming")),
    (1, 70, 800, 4, 2, 128, None, dict(RUN8, rope_attend="exact")),
]


@pytest.mark.parametrize("B,tq,tk,H,K,D,lens,overrides", ATTEND_CASES)
def test_attend_matches_reference_fp32(B, tq, tk, H, K, D, lens, overrides):
    cfg, q, k, v, geo, rope = setup(B, tq, tk, H, K, D, lens=lens, **overrides)
    starts = run_stages(q, k, geo, cfg, rope, reference.score_chunks).starts
    if tk > cfg.sink + cfg.window:
        assert (starts != SENTINEL).any()
    want = reference.attend(q, k, v, starts, geo, cfg, rope, D ** -0.5)
    got = ops.attend(q, k, v, starts, geo, cfg, rope, D ** -0.5)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("tq,rope_attend", [(1, "streaming"), (50, "exact")])
def test_attend_bf16_error_is_within_reference_rounding(tq, rope_attend):
    cfg, q, k, v, geo, rope = setup(2, tq, 600, 8, 2, 128, lens=[600, 521], seed=7, rope_attend=rope_attend)
    starts = run_stages(q, k, geo, cfg, rope, reference.score_chunks).starts
    lp = [x.bfloat16() for x in (q, k, v)]
    exact = reference.attend(*[x.float() for x in lp], starts, geo, cfg, rope, 128 ** -0.5)
    ref_lp = reference.attend(*lp, starts, geo, cfg, rope, 128 ** -0.5)        # bf16 rounding only
    got = ops.attend(*lp, starts, geo, cfg, rope, 128 ** -0.5)
    assert got.dtype == torch.bfloat16
    # Rounding q.k and p to bf16 costs a few output roundings: bound at 4x the output rounding.
    assert _rel_err(got, exact) <= 4 * _rel_err(ref_lp, exact) + 1e-3
    assert _rel_err(got, exact) < 2e-2


def test_decode_merge_over_many_splits():
    """Split-K decode with more splits than one merge load takes (40 splits, 16 per load): the
    online merge across loads, rows with different lengths."""
    cfg, q, k, v, geo, rope = setup(2, 1, 1200, 8, 2, 128, lens=[1200, 700], window=512)
    starts = run_stages(q, k, geo, cfg, rope, reference.score_chunks).starts
    want = reference.attend(q, k, v, starts, geo, cfg, rope, 128 ** -0.5)
    got = ops.attend(q, k, v, starts, geo, cfg, rope, 128 ** -0.5, tuning=dict(block_n=16, programs_per_sm=64))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_attend_ignores_unwritten_cache():
    cfg, q, k, v, geo, rope = setup(2, 1, 640, 4, 2, 64, lens=[640, 400])
    starts = run_stages(q, k, geo, cfg, rope, reference.score_chunks).starts
    out = ops.attend(q, k, v, starts, geo, cfg, rope, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[1, 400:], v2[1, 400:] = float("nan"), float("nan")
    torch.testing.assert_close(ops.attend(q, k2, v2, starts, geo, cfg, rope, 0.125), out)


@pytest.mark.parametrize("sharing,modes,scaling", [
    ("kv", ("relative", "streaming"), 1.0), ("all", ("exact", "exact"), 1.0),
    ("kv", ("exact", "streaming"), 1.25), ("kv", ("relative", "exact"), 1.25),   # YaRN-like: the kernels
])                                                                               # compile the scale in
def test_hip_attention_triton_matches_reference(sharing, modes, scaling):
    q, k, v = rand_qkv(1, 33, 900, 8, 2, 64, seed=11)
    cfg = TINY.replace(head_sharing=sharing, rope_prune=modes[0], rope_attend=modes[1])
    rope = RoPE(RoPE.default(64).inv_freq.to(DEVICE), attention_scaling=scaling)
    want, m_ref = hip_attention(q, k, v, config=cfg, rope=rope, backend="reference")
    got, m_tri = hip_attention(q, k, v, config=cfg, rope=rope, backend="triton")
    assert torch.equal(m_tri.starts, m_ref.starts), "the kernels must select the same chunks"
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # Decode: a full refresh, then a refresh from the last stage with the saved input.
    q1, a, b = q[:, -1:], None, None
    for stage in (0, cfg.n_stages - 1):
        want, a = hip_attention(q1, k, v, config=cfg, rope=rope, mask=a, refresh_stage=stage, backend="reference")
        got, b = hip_attention(q1, k, v, config=cfg, rope=rope, mask=b, refresh_stage=stage, backend="triton")
        assert torch.equal(a.starts, b.starts)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_budget_of_one_chunk_matches_reference():
    """A final budget of one chunk keeps one chunk per row: the bitonic top-1 (tl.topk(x, 1)) failed
    to build, under the interpreter and for the GPU alike."""
    q, k, v = rand_qkv(1, 1, 300, 4, 2, 64, seed=3)
    cfg = TINY.replace(budget=TINY.chunk_size, dense_layer_budget=TINY.chunk_size)
    rope = RoPE.default(64)
    want, m_ref = hip_attention(q, k, v, config=cfg, rope=rope, backend="reference")
    got, m_tri = hip_attention(q, k, v, config=cfg, rope=rope, backend="triton")
    assert m_ref.starts.shape[-1] == 1 and torch.equal(m_tri.starts, m_ref.starts)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_hip_attention_takes_views_strided_along_head_dim():
    """q/k/v strided along head_dim (here views of (B, T, D, heads) tensors): the reference and SDPA
    take them; the Triton path refused them from inside its kernels ("score_chunks needs float32
    pooled queries ..."), so "auto" answered on the CPU and failed on the GPU."""
    q, k, v = rand_qkv(1, 3, 300, 4, 2, 64, seed=5)
    qs, ks, vs = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v))
    assert ks.stride(-1) != 1
    cfg, rope = TINY, RoPE.default(64)
    want, m_ref = hip_attention(q, k, v, config=cfg, rope=rope, backend="triton")
    got, m_tri = hip_attention(qs, ks, vs, config=cfg, rope=rope, backend="triton")
    assert torch.equal(m_tri.starts, m_ref.starts)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    from infinitehip.attention.api import cache_prune
    assert torch.equal(cache_prune(qs, ks, config=cfg, rope=rope, backend="triton").starts, m_ref.starts)


# The compile-time constants that depend on the query count, per kernel (module, kernel name).
_SHAPE_CONSTANTS = {("pool", "_pool_kernel"): ("ROWS", "R", "R_P", "STRIDE"),
                    ("prune", "_score_chunks_kernel"): ("R", "BLOCK_M", "M_TILES"),
                    ("ops", "_bsa_kernel"): ("BLOCK_T", "BLOCK_M", "SPLIT_TILE")}


def test_prompt_tails_of_any_length_share_compiled_kernels(monkeypatch):
    """One query block of 2-64 queries (a prompt's tail after a reused prefix: a server's second
    question about a document) pools the whole padded block and attends in 16-query tiles, so
    every such length launches the kernels with the same compile-time constants. Pooling only
    the real rows compiled each new length anew: 20-30 s on its first use (H200, docs/server.md)."""
    import importlib

    seen = {}
    for (module, name), constants in _SHAPE_CONSTANTS.items():
        mod = importlib.import_module(f"infinitehip.attention.triton.{module}")
        kernel = getattr(mod, name)

        class Recorder:   # kernel[grid](...) as before, noting the constants of each launch
            def __getitem__(self, grid, kernel=kernel, key=name, constants=constants):
                def launch(*args, **kw):
                    seen.setdefault(key, set()).add(tuple(kw[c] for c in constants))
                    return kernel[grid](*args, **kw)
                return launch

        monkeypatch.setattr(mod, name, Recorder())
    q, k, v = rand_qkv(1, 64, 900, 8, 2, 64, seed=13)
    rope = RoPE.default(64)
    for tq in (2, 16, 17, 64):
        want, m_ref = hip_attention(q[:, -tq:], k, v, config=TINY, rope=rope, backend="reference")
        got, m_tri = hip_attention(q[:, -tq:], k, v, config=TINY, rope=rope, backend="triton")
        assert torch.equal(m_tri.starts, m_ref.starts)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert len(seen["_pool_kernel"]) == len(set(TINY.stage_strides))     # one per pooling stride
    assert len(seen["_score_chunks_kernel"]) == len(seen["_pool_kernel"])
    # 16-query tiles for 2-16 queries (decode's split path) and for more (4 query heads a kv head)
    assert len(seen["_bsa_kernel"]) == 1
    seen.clear()   # decode (one query) keeps its own variants: one pooled row, one-query tiles
    hip_attention(q[:, -1:], k, v, config=TINY, rope=rope, backend="triton")
    assert seen["_pool_kernel"] == {(1, 1, 1, 1)} and {c[0] for c in seen["_bsa_kernel"]} == {1}
