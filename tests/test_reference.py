"""The PyTorch reference against dense attention, a planted needle, and decode mask reuse."""
import pytest
import torch

from infinitehip import HiPConfig, RoPE, hip_attention
from infinitehip.attention.api import dense_attention
from infinitehip.attention.mask import SENTINEL, geometry
from infinitehip.attention import reference

TINY = HiPConfig.preset("tiny")
# Budgets large enough to keep every chunk: sparse attention must then equal dense attention.
FULL = TINY.replace(stage_budgets=(None, 4096, 4096), budget=4096, dense_layer_budget=4096,
                    rope_prune="exact", rope_attend="exact")


def rand_qkv(B, tq, tk, H, K, D, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, tq, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, tk, K, D, generator=g).to(device, dtype)
    v = torch.randn(B, tk, K, D, generator=g).to(device, dtype)
    return q, k, v


def device_for(backend: str) -> str:
    """Triton runs on the GPU when there is one, else through the interpreter on the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def dense(q, k, v, rope, kv_len=None):
    B, tk, D = k.shape[0], k.shape[1], k.shape[3]
    kv_len = torch.full((B,), tk, device=q.device) if kv_len is None else kv_len
    return dense_attention(q, k, v, kv_len, rope, D ** -0.5)


@pytest.mark.parametrize("B,tq,tk,H,K,D", [
    (1, 300, 300, 4, 4, 64),     # ragged: neither a multiple of the query block nor of a chunk
    (2, 200, 517, 8, 2, 64),     # chunked prefill: queries are the last 200 of 517 keys, GQA 4
    (1, 1, 700, 8, 1, 128),      # decode, GQA 8
    (1, 3, 450, 4, 2, 80),       # a few decode queries, head_dim not a power of two
])
@pytest.mark.parametrize("sharing", ["kv", "all"])
def test_full_budget_equals_dense(B, tq, tk, H, K, D, sharing):
    q, k, v = rand_qkv(B, tq, tk, H, K, D)
    rope = RoPE.default(D)
    out, mask = hip_attention(q, k, v, config=FULL.replace(head_sharing=sharing), rope=rope, backend="reference")
    assert mask is not None, "this context is long enough for the sparse path"
    torch.testing.assert_close(out, dense(q, k, v, rope), atol=2e-5, rtol=2e-5)



@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("tq,tk", [(1, 161), (32, 200), (40, 230)])
def test_full_budget_streaming_positions_equal_dense(backend, tq, tk):
    """Streaming positions with a budget covering every key are the true positions. The window
    start is not chunk-aligned here, so the last selected chunk runs into the window: its masked
    keys must take no position (they used to shift the sink and selected keys back by up to
    chunk_size - 1, ~0.05-0.2 off dense)."""
    dev = device_for(backend)
    q, k, v = rand_qkv(2, tq, tk, 4, 2, 64, seed=11, device=dev)
    rope = RoPE.default(64)
    cfg = FULL.replace(rope_prune="relative", rope_attend="streaming", dense_threshold=0)
    out, mask = hip_attention(q, k, v, config=cfg, rope=rope, backend=backend)
    assert mask is not None, "this context is long enough for the sparse path"
    torch.testing.assert_close(out, dense(q, k, v, rope), atol=5e-5, rtol=5e-5)

def test_short_context_is_dense_and_exact():
    q, k, v = rand_qkv(1, 100, 150, 4, 2, 64)  # 150 <= sink + window = 160
    rope = RoPE.default(64)
    out, mask = hip_attention(q, k, v, config=TINY, rope=rope)
    assert mask is None
    torch.testing.assert_close(out, dense(q, k, v, rope))


def test_cache_seqlens_masks_unwritten_keys():
    q, k, v = rand_qkv(2, 1, 800, 4, 2, 64)
    lens = torch.tensor([800, 555])
    rope = RoPE.default(64)
    out, _ = hip_attention(q, k, v, config=FULL, rope=rope, cache_seqlens=lens, backend="reference")
    garbage = k.clone()
    garbage[1, 555:] = 1e4  # unwritten cache slots must never be read into the output
    out2, _ = hip_attention(q, garbage, v, config=FULL, rope=rope, cache_seqlens=lens, backend="reference")
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(out[1:], dense(q[1:], k[1:, :555], v[1:, :555], rope))


@pytest.mark.parametrize("tq", [1, 40])   # 40: a ragged last query block, whose padding rows see past the end
def test_cache_seqlens_ignores_nan_in_unwritten_slots(tq):
    """A cache made with torch.empty may hold NaN or inf past cache_seqlens: the window slots that
    run past a row's end read them, and their softmax weight 0 times NaN made the row NaN (the
    Triton kernel's masked loads never did: test_attend_ignores_unwritten_cache)."""
    q, k, v = rand_qkv(2, tq, 800, 4, 2, 64)
    lens = torch.tensor([800, 555])
    rope = RoPE.default(64)
    out, _ = hip_attention(q, k, v, config=FULL, rope=rope, cache_seqlens=lens, backend="reference")
    k2, v2 = k.clone(), v.clone()
    k2[1, 555:], v2[1, 555:600], v2[1, 600:] = float("nan"), float("nan"), float("inf")
    out2, mask = hip_attention(q, k2, v2, config=FULL, rope=rope, cache_seqlens=lens, backend="reference")
    assert mask is not None, "the sparse path"
    torch.testing.assert_close(out2, out)


def planted_needle(tk=4096, H=4, K=2, D=64, at=1000, seed=1):
    """Keys are noise except one chunk that matches the last queries strongly."""
    q, k, v = rand_qkv(1, 32, tk, H, K, D, seed=seed)
    direction = torch.randn(D, generator=torch.Generator().manual_seed(seed + 1))
    direction = direction / direction.norm() * 8
    q[:, :] = 0.3 * q[:, :] + direction             # every query head looks for `direction`
    k[:, at:at + 8] = direction                     # the needle: 8 keys far outside sink and window
    v[:, at:at + 8] = 5.0
    return q, k, v


@pytest.mark.parametrize("rope_modes", [("exact", "exact"), ("relative", "streaming")])
def test_planted_needle_is_selected_and_dominates(rope_modes):
    q, k, v = planted_needle()
    cfg = TINY.replace(rope_prune=rope_modes[0], rope_attend=rope_modes[1])
    out, mask = hip_attention(q, k, v, config=cfg, rope=None, backend="reference")
    hit = ((mask.starts >= 1000) & (mask.starts < 1008)).any(dim=-1)   # (B, G, NQB)
    assert hit.all(), "every head group and query block selects the needle"
    assert out.float().mean() > 4.0, "the needle's values should dominate the output"
    # Sink + window alone (an empty selection) miss it.
    geo = geometry(torch.tensor([4096 - 32]), 32, torch.tensor([4096]), cfg)
    empty = torch.full_like(mask.starts, SENTINEL)
    blind = reference.attend(q, k, v, empty, geo, cfg, None, 64 ** -0.5)
    assert blind.float().mean().abs() < 0.5


def test_decode_mask_reuse_matches_recompute():
    q, k, v = rand_qkv(2, 1, 3000, 8, 2, 64, seed=3)
    rope = RoPE.default(64)
    fresh, mask = hip_attention(q, k, v, config=TINY, rope=rope, backend="reference")
    for stage in range(TINY.n_stages + 1):
        out, m = hip_attention(q, k, v, config=TINY, rope=rope, mask=mask, refresh_stage=stage, backend="reference")
        torch.testing.assert_close(out, fresh)
        assert torch.equal(m.starts, mask.starts)


def test_refresh_reruns_only_named_stages():
    q, k, v = rand_qkv(1, 1, 3000, 4, 2, 64, seed=4)
    rope = RoPE.default(64)
    _, mask = hip_attention(q, k, v, config=TINY, rope=rope, backend="reference")
    # A refresh from stage 2 must take its candidates from the saved stage-2 input only:
    # poison stage 0/1 inputs and blank out the final mask; the result must not change.
    poisoned = type(mask)(torch.full_like(mask.starts, SENTINEL),
                          (None, torch.full_like(mask.stage_inputs[1], SENTINEL), mask.stage_inputs[2]))
    _, m2 = hip_attention(q, k, v, config=TINY, rope=rope, mask=poisoned, refresh_stage=2, backend="reference")
    assert torch.equal(m2.starts, mask.starts)
    # ...while a refresh from stage 1 reads the (poisoned) stage-1 input and finds nothing.
    _, m1 = hip_attention(q, k, v, config=TINY, rope=rope, mask=poisoned, refresh_stage=1, backend="reference")
    assert (m1.starts == SENTINEL).all()


def test_stage0_levels_probes_fixed_positions_only():
    """Stopped after 2 levels, stage 0 probes a 32-key chunk at offsets 8, 24 (level 0) and
    4, 12, 20, 28 (level 1) only: keys elsewhere in the chunks cannot change its mask, the full
    descent's can. Full depth as a number is the default (None)."""
    q, k, v = rand_qkv(1, 1, 3000, 4, 2, 64, seed=6)
    rope = RoPE.default(64)
    fixed = torch.zeros(3000, dtype=torch.bool)
    for offset in (4, 8, 12, 20, 24, 28):
        fixed[offset::32] = True
    k2 = torch.where(fixed[None, :, None, None], k, torch.randn(k.shape, generator=torch.Generator().manual_seed(7)))

    def stage1_input(cfg, keys):
        _, mask = hip_attention(q, keys, v, config=cfg, rope=rope, backend="reference")
        return mask.stage_inputs[1]
    capped = TINY.replace(stage0_levels=2)
    assert torch.equal(stage1_input(capped, k), stage1_input(capped, k2))
    assert not torch.equal(stage1_input(TINY, k), stage1_input(TINY, k2))
    full = TINY.replace(stage0_levels=5)
    _, m_none = hip_attention(q, k, v, config=TINY, rope=rope, backend="reference")
    _, m_full = hip_attention(q, k, v, config=full, rope=rope, backend="reference")
    assert torch.equal(m_none.starts, m_full.starts)


def test_mask_granularity_and_order():
    q, k, v = rand_qkv(1, 64, 2000, 4, 2, 64, seed=5)
    _, mask = hip_attention(q, k, v, config=TINY, rope=RoPE.default(64), backend="reference")
    s = mask.starts
    assert s.shape == (1, 2, 2, TINY.n_selected)
    valid = s[s != SENTINEL]
    assert (valid % TINY.chunk_size == 0).all() and (valid >= TINY.sink - TINY.chunk_size).all()
    assert (s[..., 1:] >= s[..., :-1]).all(), "selected chunks are sorted by position"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_with_mask_reuse_loses_no_key(backend):
    """Full budget, default refresh schedule: every decode step still equals dense attention.

    Between refreshes the window must stay anchored where stage 0 pruned, or the keys that
    slide out of it would be attended by nobody.
    """
    cfg = FULL.replace(refresh_intervals=(8, 4, 2), window=16, sink=16)
    B, H, K, D, T0, steps = 1, 4, 2, 64, 300, 10
    q, k, v = rand_qkv(B, steps, T0 + steps, H, K, D, seed=7, device=device_for(backend))
    rope = RoPE.default(D)
    mask = None
    for t in range(steps):
        n = T0 + t + 1
        out, mask = hip_attention(q[:, t:t + 1], k[:, :n], v[:, :n], config=cfg, rope=rope, mask=mask,
                                  refresh_stage=cfg.refresh_stage(t), backend=backend)
        torch.testing.assert_close(out, dense(q[:, t:t + 1], k[:, :n], v[:, :n], rope), atol=5e-5, rtol=5e-5)


def _cat_masks(masks):
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return type(masks[0])(cat([m.starts for m in masks]), tuple(cat(list(s)) for s in zip(*[m.stage_inputs for m in masks])),
                          cat([m.w0 for m in masks]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_row_refresh_equals_separate_calls(backend):
    """Rows decoding at different steps (continuous batching) refresh on their own schedules:
    one batched call gives each row exactly what a call of its own gives."""
    cfg = TINY.replace(refresh_intervals=(6, 3, 2))
    H, K, D, steps = 4, 2, 64, 4
    lens, phases = [900, 1400, 1100], [0, 5, 3]        # prompt lengths; steps each row decoded before
    q, k, v = rand_qkv(3, max(phases) + steps, 1400 + max(phases) + steps, H, K, D, seed=11, device=device_for(backend))
    rope = RoPE.default(D)
    alone = []                                          # each row's mask after its first `phase` steps
    for b, (n, p) in enumerate(zip(lens, phases)):
        m = None
        for t in range(p):
            _, m = hip_attention(q[b:b + 1, t:t + 1], k[b:b + 1, :n + t + 1], v[b:b + 1, :n + t + 1], config=cfg,
                                 rope=rope, mask=m, refresh_stage=cfg.refresh_stage(t), backend=backend)
        alone.append(m)
    for t in range(steps):
        kv_len = torch.tensor([n + p + t + 1 for n, p in zip(lens, phases)], device=q.device)
        want, want_masks = [], []
        for b in range(3):
            step, n = phases[b] + t, int(kv_len[b])
            o, m = hip_attention(q[b:b + 1, step:step + 1], k[b:b + 1, :n], v[b:b + 1, :n], config=cfg, rope=rope,
                                 mask=alone[b], refresh_stage=cfg.refresh_stage(step), backend=backend)
            want.append(o)
            want_masks.append(m)
        if t == 0:   # the batch's mask: each row's own; a row with none gets a placeholder (it refreshes from 0)
            mask = _cat_masks([m if m is not None else want_masks[b] for b, m in enumerate(alone)])
        qs = torch.cat([q[b:b + 1, phases[b] + t:phases[b] + t + 1] for b in range(3)])
        got, mask = hip_attention(qs, k[:, :int(kv_len.max())], v[:, :int(kv_len.max())], config=cfg, rope=rope,
                                  cache_seqlens=kv_len, mask=mask,
                                  refresh_stage=[cfg.refresh_stage(p + t) for p in phases], backend=backend)
        assert len({cfg.refresh_stage(p + t) for p in phases}) > 1 or t > 0
        torch.testing.assert_close(got, torch.cat(want), atol=2e-5, rtol=2e-5)
        assert torch.equal(mask.starts, torch.cat([m.starts for m in want_masks]))
        assert torch.equal(mask.w0, torch.cat([m.w0 for m in want_masks]))
        alone = want_masks


def test_per_row_stages_reach_the_device_once_per_pattern():
    """Each layer of a batch at mixed refresh phases copied its rows' stages to the device anew (on
    a GPU a copy that waited for the GPU to drain, in every layer of such a step): one read-only
    tensor per pattern now, with the same values."""
    from infinitehip.attention import api

    q, k, v = rand_qkv(2, 1, 900, 4, 2, 64)
    _, mask = hip_attention(q, k, v, config=TINY, backend="reference")
    first, rows = api._refresh_rows([1, TINY.n_stages], 2, TINY, mask, k.device)
    again, same = api._refresh_rows([1, TINY.n_stages], 2, TINY, mask, k.device)
    assert first == again == 1 and rows.tolist() == [1, TINY.n_stages] and same is rows
    assert api._refresh_rows([2, 2], 2, TINY, mask, k.device) == (2, None)


def test_row_stages_on_the_device_are_the_list():
    """A CUDA graph passes each row's stage as a device buffer (api.RowStages: its minimum on the
    host): the same outputs and masks as the list, and bad ones refused."""
    from infinitehip.attention.api import RowStages, cache_attention

    q, k, v = rand_qkv(3, 1, 900, 4, 2, 64)
    lens = torch.tensor([900, 700, 820])
    _, mask = hip_attention(q, k, v, config=TINY, cache_seqlens=lens, backend="reference")
    stages = [1, TINY.n_stages, 2]
    want, want_mask = cache_attention(q, k, v, config=TINY, cache_seqlens=lens, mask=mask, refresh_stage=stages,
                                      backend="reference")
    got, got_mask = cache_attention(q, k, v, config=TINY, cache_seqlens=lens, mask=mask, backend="reference",
                                    refresh_stage=RowStages(1, torch.tensor(stages)))
    assert torch.equal(got, want) and torch.equal(got_mask.starts, want_mask.starts)
    assert torch.equal(got_mask.w0, want_mask.w0)
    for bad, match in ((RowStages(TINY.n_stages + 1, torch.tensor(stages)), "RowStages.first=4"),
                       (RowStages(1, torch.tensor(stages[:2])), r"must be a \(3,\) int64 tensor"),
                       (RowStages(1, torch.tensor(stages, device="meta")), "RowStages.rows is on meta")):
        with pytest.raises(ValueError, match=match):
            cache_attention(q, k, v, config=TINY, cache_seqlens=lens, mask=mask, refresh_stage=bad, backend="reference")


def test_per_row_refresh_errors():
    q, k, v = rand_qkv(2, 1, 900, 4, 2, 64)
    with pytest.raises(ValueError, match="one per row"):
        hip_attention(q, k, v, config=TINY, refresh_stage=[0, 0, 0], backend="reference")
    with pytest.raises(ValueError, match="must be an int"):
        hip_attention(q, k, v, config=TINY, refresh_stage=[0, None], backend="reference")


def test_reference_slices_give_the_one_call_result(monkeypatch):
    """The reference path attends long prompts a few query blocks at a time (bounded memory);
    slices of unequal size must give the output and mask of one slice over every query."""
    from infinitehip.attention import api

    q, k, v = rand_qkv(1, 7 * TINY.block_size_q - 5, 900, 4, 2, 64, seed=4)
    rope = RoPE.default(64, 10000.0)
    cfg = TINY.replace(dense_threshold=0)
    monkeypatch.setattr(api, "_reference_slice", lambda q, *a: q.shape[1])
    whole, whole_mask = hip_attention(q, k, v, config=cfg, rope=rope, backend="reference")
    monkeypatch.setattr(api, "_reference_slice", lambda q, *a: 3 * cfg.block_size_q)   # 3 + 3 + 1 blocks
    sliced, sliced_mask = hip_attention(q, k, v, config=cfg, rope=rope, backend="reference")
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(sliced_mask.starts, whole_mask.starts) and torch.equal(sliced_mask.w0, whole_mask.w0)


@pytest.mark.parametrize("chunk,tq,fp8", [(4, 70, False), (2, 1, False), (8, 40, True)])
def test_token_scores_give_the_probe_scores(chunk, tq, fp8, monkeypatch):
    """Small chunks over all keys with relative pruning: scoring every key once and picking the
    probes (``_token_scores``) gives the probe-by-probe scores (plain and FP8-scaled keys, a
    ragged last query block, decode)."""
    from infinitehip.attention.pages import KVPages
    from infinitehip.attention.stages import first_stage_starts
    from infinitehip.cache.offload import fp8_encode

    cfg = HiPConfig.preset("tiny", rope_prune="relative", chunk_sizes=(chunk, 2), stage_budgets=(None, 128),
                           stage_strides=(2, 1), refresh_intervals=(8, 4))
    g = torch.Generator().manual_seed(chunk)
    B, tk, H, K, D = 2, 512, 4, 2, 32
    q, k = torch.randn(B, tq, H, D, generator=g), torch.randn(B, tk, K, D, generator=g)
    pages = None
    if fp8:
        codes, scale = fp8_encode(k.view(B * tk // 8, 8, K, D))
        k, pages = codes.view(B, tk, K, D), KVPages(8, k_scale=scale.view(B, tk // 8, K), v_scale=scale.view(B, tk // 8, K))
    kv_len = torch.tensor([tk, 400])
    geo = geometry(kv_len - tq, tq, kv_len, cfg)
    rope = RoPE(RoPE.default(D).inv_freq, 1.25)
    qp, q_valid = reference.pool_queries(q, geo, cfg.stage_strides[0], rope)
    starts = first_stage_starts(tk, chunk, B, K, geo.p0.shape[1], "cpu")
    dense = reference.score_chunks(qp, q_valid, k, starts, chunk, geo, cfg, rope, pages)
    monkeypatch.setattr(reference, "DENSE_CHUNK", 0)                    # probe by probe
    probed = reference.score_chunks(qp, q_valid, k, starts, chunk, geo, cfg, rope, pages)
    assert (probed > -1e29).sum() > 100
    torch.testing.assert_close(dense, probed, rtol=1e-5, atol=1e-5)
