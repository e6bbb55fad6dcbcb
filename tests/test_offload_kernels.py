"""Paged reads (block table into a page pool) and FP8-scaled reads: reference and Triton kernels
against the plain read of the same values (on CPU through TRITON_INTERPRET=1)."""
import dataclasses

import pytest
import torch

from infinitehip import HiPConfig, RoPE
from infinitehip.attention import reference
from infinitehip.attention.mask import geometry
from infinitehip.attention.pages import KVPages
from infinitehip.attention.reference import pool_queries
from infinitehip.attention.stages import first_stage_starts, run_stages
from infinitehip.cache.offload import fp8_decode, fp8_encode

_ops = pytest.importorskip("infinitehip.attention.triton.ops")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # Triton on the GPU, else the interpreter


def _to(x, device):
    """Tensors, and the tensors inside dataclasses (Geometry, KVPages, HiPMask), on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(t, device) for t in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, (type, HiPConfig)):
        return dataclasses.replace(x, **{f.name: _to(getattr(x, f.name), device) for f in dataclasses.fields(x)
                                         if f.init})
    return x


class ops:
    """The Triton ops, called on DEVICE with CPU inputs; results come back to the CPU."""

    @staticmethod
    def attend(*args, **kw):
        return _ops.attend(*_to(list(args), DEVICE), **{k: _to(v, DEVICE) for k, v in kw.items()}).cpu()

    @staticmethod
    def score_chunks(*args, **kw):
        return _ops.score_chunks(*_to(list(args), DEVICE), **{k: _to(v, DEVICE) for k, v in kw.items()}).cpu()

TINY = HiPConfig.preset("tiny")
PAGE = 4


def setup(B=2, tq=1, tk=400, H=4, K=2, D=32, lens=(400, 333), seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, tq, H, D, generator=g)
    k, v = torch.randn(B, tk, K, D, generator=g), torch.randn(B, tk, K, D, generator=g)
    kv_len = torch.tensor(lens)
    geo = geometry(kv_len - tq, tq, kv_len, TINY)
    rope = RoPE.default(D)
    mask = run_stages(q, k, geo, TINY, rope, reference.score_chunks)
    return q, k, v, geo, rope, mask


def scatter_to_pool(x: torch.Tensor, seed=1):
    """x (B, Tk, K, D) -> a shuffled pool (N, PAGE, K, D) with junk pages, and its table (B, NB)."""
    B, tk, K, D = x.shape
    nb = tk // PAGE
    n = B * nb + 7
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:B * nb].view(B, nb)
    pool = torch.full((n, PAGE, K, D), 1e4)          # junk: any wrong read shows
    pool[perm.flatten()] = x.view(B * nb, PAGE, K, D)
    return pool, perm.to(torch.int32)


def test_paged_attend_reads_the_same_values():
    q, k, v, geo, rope, mask = setup()
    kp, table = scatter_to_pool(k)
    vp, _ = scatter_to_pool(v)
    pages = KVPages(PAGE, table=table)
    want = reference.attend(q, k, v, mask.starts, geo, TINY, rope, 0.3)
    got = reference.attend(q, kp, vp, mask.starts, geo, TINY, rope, 0.3, pages=pages)
    assert torch.equal(got, want)                   # bit for bit: the same values, the same math
    plain = ops.attend(q, k, v, mask.starts, geo, TINY, rope, 0.3)
    paged = ops.attend(q, kp, vp, mask.starts, geo, TINY, rope, 0.3, pages=pages)
    assert torch.equal(paged, plain)
    torch.testing.assert_close(paged, want, rtol=1e-4, atol=1e-4)


def scatter_heads_to_pool(x: torch.Tensor, seed=2):
    """x (B, Tk, K, D) -> a shuffled pool of one-head pages (N, PAGE, 1, D) with junk, and its
    per-head table (B, NB, K): what the GPU page cache builds."""
    B, tk, K, D = x.shape
    nb = tk // PAGE
    units = x.view(B, nb, PAGE, K, D).permute(0, 1, 3, 2, 4).reshape(B * nb * K, PAGE, 1, D)
    n = units.shape[0] + 5
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:units.shape[0]]
    pool = torch.full((n, PAGE, 1, D), 1e4)
    pool[perm] = units
    return pool, perm.view(B, nb, K).to(torch.int32)


@pytest.mark.parametrize("sharing,tq", [("kv", 1), ("all", 1), ("kv", 40)])
def test_per_head_table_reads_the_same_values(sharing, tq):
    """A table with a slot per (page, kv head) into one-head pages: the same values as the plain
    read, bit for bit in the reference and in the Triton kernel (decode and a prefill block)."""
    cfg = TINY.replace(head_sharing=sharing)
    q, k, v, _, rope, _ = setup(B=1 if tq > 1 else 2, tq=tq, lens=(400,) if tq > 1 else (400, 333))
    kv_len = torch.tensor((400,) if tq > 1 else (400, 333))
    geo = geometry(kv_len - tq, tq, kv_len, cfg)
    mask = run_stages(q, k, geo, cfg, rope, reference.score_chunks)
    kp, table = scatter_heads_to_pool(k)
    vp, _ = scatter_heads_to_pool(v)
    pages = KVPages(PAGE, table=table)
    want = reference.attend(q, k, v, mask.starts, geo, cfg, rope, 0.3)
    assert torch.equal(reference.attend(q, kp, vp, mask.starts, geo, cfg, rope, 0.3, pages=pages), want)
    plain = ops.attend(q, k, v, mask.starts, geo, cfg, rope, 0.3)
    assert torch.equal(ops.attend(q, kp, vp, mask.starts, geo, cfg, rope, 0.3, pages=pages), plain)



def test_pages_not_resident_read_slot_0_never_before_the_pool():
    """A -1 table entry (a page not resident) is read by a batch runner's row parked in a decode
    step while it prefills: it reuses its mask at a position past its last fetch (its output is
    discarded). The kernel read the PAGE rows before the pool there (on a GPU: memory it does not
    own); it reads slot 0, as the reference does, and the other rows are untouched."""
    q, k, v, geo, rope, mask = setup()
    kp, table = scatter_heads_to_pool(k)
    vp, _ = scatter_heads_to_pool(v)

    def after_nan(pool):   # the pool in memory right after NaN rows: a read before it shows
        big = torch.full((pool.shape[0] + 4, *pool.shape[1:]), float("nan"))
        big[4:] = pool
        return big[4:]

    kp, vp = after_nan(kp), after_nan(vp)
    absent = table.clone()
    absent[1, 333 // PAGE - 3:] = -1                      # row 1's last pages, its window: not resident
    pages = KVPages(PAGE, table=absent)
    got = ops.attend(q, kp, vp, mask.starts, geo, TINY, rope, 0.3, pages=pages)
    assert got.isfinite().all()
    torch.testing.assert_close(got, reference.attend(q, kp, vp, mask.starts, geo, TINY, rope, 0.3, pages=pages),
                               rtol=1e-4, atol=1e-4)
    whole = ops.attend(q, kp, vp, mask.starts, geo, TINY, rope, 0.3, pages=KVPages(PAGE, table=table))
    assert torch.equal(got[0], whole[0])

def test_paged_attend_prefill_block():
    q, k, v, geo, rope, mask = setup(B=1, tq=40, lens=(400,))
    kp, table = scatter_to_pool(k)
    vp, _ = scatter_to_pool(v)
    pages = KVPages(PAGE, table=table)
    plain = ops.attend(q, k, v, mask.starts, geo, TINY, rope, 0.3)
    assert torch.equal(ops.attend(q, kp, vp, mask.starts, geo, TINY, rope, 0.3, pages=pages), plain)


def fp8_layout(x: torch.Tensor):
    """x (B, Tk, K, D) -> codes (B, Tk, K, D) fp8, scales (B, NB, K), decoded (B, Tk, K, D)."""
    B, tk, K, D = x.shape
    codes, scale = fp8_encode(x.view(B * tk // PAGE, PAGE, K, D))
    decoded = fp8_decode(codes, scale, torch.float32).view(B, tk, K, D)
    return codes.view(B, tk, K, D), scale.view(B, tk // PAGE, K), decoded


def test_fp8_scaled_reads_match_decoded_values():
    q, k, v, geo, rope, mask = setup()
    kc, ks, kd = fp8_layout(k)
    vc, vs, vd = fp8_layout(v)
    pages = KVPages(PAGE, k_scale=ks, v_scale=vs)
    want = reference.attend(q, kd, vd, mask.starts, geo, TINY, rope, 0.3)
    assert torch.equal(reference.attend(q, kc, vc, mask.starts, geo, TINY, rope, 0.3, pages=pages), want)
    got = ops.attend(q, kc, vc, mask.starts, geo, TINY, rope, 0.3, pages=pages)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    qp, q_valid = pool_queries(q, geo, TINY.stage_strides[1], rope)
    starts = mask.stage_inputs[1].long()
    want = reference.score_chunks(qp, q_valid, kd, starts, TINY.chunk_sizes[1], geo, TINY, rope)
    ref = reference.score_chunks(qp, q_valid, kc, starts, TINY.chunk_sizes[1], geo, TINY, rope, pages=pages)
    got = ops.score_chunks(qp, q_valid, kc, starts, TINY.chunk_sizes[1], geo, TINY, rope, pages=pages)
    assert torch.equal(ref, want)
    # Low-precision keys are scored in tf32 on the GPU (``prune._PRUNE_DOT_PRECISION``).
    tol = 2e-3 if DEVICE == "cuda" else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("fp8", [False, True])
def test_probe_copy_serves_the_keys_at_its_stride(fp8):
    """With a probe copy, the pruning kernel reads keys at multiples of the stride from it and every
    other key from the store: the store's rows there can hold anything (junk here) and the scores
    are those of the real keys; without the copy the junk shows."""
    q, k, v, geo, rope, mask = setup(tk=400)
    stride = TINY.chunk_sizes[0] // 4            # stage 0's first level probes its odd multiples
    pages = None
    if fp8:
        k, ks, _ = fp8_layout(k)
        pages = KVPages(PAGE, k_scale=ks, v_scale=ks)
    junk = k.clone()
    junk[:, ::stride] = torch.full_like(junk[:, ::stride], 100.0, dtype=torch.float32).to(k.dtype)
    copy = k[:, ::stride].contiguous()                                          # (B, ceil(Tk / stride), K, D)
    with_copy = dataclasses.replace(pages or KVPages(1), probes=copy, probe_stride=stride)
    qp, q_valid = pool_queries(q, geo, TINY.stage_strides[0], rope)
    starts = first_stage_starts(k.shape[1], TINY.chunk_sizes[0], 2, 2, 1)
    for levels in (1, None):
        want = ops.score_chunks(qp, q_valid, k, starts, TINY.chunk_sizes[0], geo, TINY, rope, pages=pages,
                                levels=levels)
        got = ops.score_chunks(qp, q_valid, junk, starts, TINY.chunk_sizes[0], geo, TINY, rope, pages=with_copy,
                               levels=levels)
        assert torch.equal(got, want)
        spoiled = ops.score_chunks(qp, q_valid, junk, starts, TINY.chunk_sizes[0], geo, TINY, rope, pages=pages,
                                   levels=levels)
        assert not torch.equal(spoiled, want)
    short = dataclasses.replace(with_copy, probes=copy[:, :-1])
    with pytest.raises(ValueError, match="probe copy"):
        ops.score_chunks(qp, q_valid, junk, starts, TINY.chunk_sizes[0], geo, TINY, rope, pages=short)


def test_pages_validation():
    with pytest.raises(ValueError, match="power of two"):
        KVPages(3)
    with pytest.raises(ValueError, match="together"):
        KVPages(4, table=torch.zeros(1, 1, dtype=torch.int32), k_scale=torch.ones(1, 1, 1), v_scale=torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="probe_stride"):
        KVPages(4, probes=torch.zeros(1, 1, 1, 1))
    with pytest.raises(ValueError, match="power of two"):
        KVPages(4, probes=torch.zeros(1, 1, 1, 1), probe_stride=12)


def test_fp8_reuse_step_reads_the_scaled_store_in_one_launch(monkeypatch):
    """A decode step that reuses its mask over an FP8 store read in place (offload, no page cache)
    takes ``ops.attend_reused`` with the scales, as the plain store does; same values as the reference."""
    from infinitehip.attention.paged import paged_hip_attention

    q, k, v, _, rope, mask = setup()
    kc, ks, kd = fp8_layout(k)
    vc, vs, vd = fp8_layout(v)
    kv_len = torch.tensor((400, 333))
    geo = reference.block_geometry(kv_len, 1, TINY, mask)
    want = reference.attend(q, kd, vd, mask.starts, geo, TINY, rope, 0.3)

    class Source:   # the store's logical view; a reuse step must neither densify nor fetch
        pages = KVPages(PAGE, k_scale=ks, v_scale=vs)

        def logical(self, tk):
            return _to([kc, vc, self.pages], DEVICE)

        def dense(self, tk):
            raise AssertionError("dense read on a sparse step")

        fetch = dense

    calls, reused = [], _ops.attend_reused
    monkeypatch.setattr(_ops, "attend_reused", lambda *a, **kw: calls.append(kw["pages"]) or reused(*a, **kw))
    for backend in ("reference", "triton"):
        got, m = paged_hip_attention(q.to(DEVICE), Source(), 400, config=TINY, rope=_to(rope, DEVICE), scale=0.3,
                                     cache_seqlens=kv_len.to(DEVICE), mask=_to(mask, DEVICE),
                                     refresh_stage=TINY.n_stages, backend=backend)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
        assert torch.equal(m.starts.cpu(), mask.starts)
    assert len(calls) == 1 and calls[0].scaled      # the Triton step, with the FP8 scales


def test_reuse_step_through_the_page_pool_in_one_launch(monkeypatch):
    """A decode step that reuses its mask over a page-cache pool fetches nothing and takes
    ``ops.attend_reused`` with the per-head table (positions computed in the kernel): the plain
    read's values, bit for bit, and the reference's."""
    from infinitehip.attention.paged import paged_hip_attention

    q, k, v, _, rope, mask = setup()
    assert mask.w0 is not None                              # a pruned mask: its window start kept
    kp, table = scatter_heads_to_pool(k)
    vp, _ = scatter_heads_to_pool(v)
    kv_len = torch.tensor((400, 333))
    geo = reference.block_geometry(kv_len, 1, TINY, mask)
    want = reference.attend(q, k, v, mask.starts, geo, TINY, rope, 0.3)

    class Source:   # the host store read in place for pruning; the pool for attention
        def logical(self, tk):
            return _to([k, v, None], DEVICE)

        def dense(self, tk):
            raise AssertionError("dense read on a sparse step")

        fetch = dense                                       # a reuse step fetches nothing

        def resident(self):
            return _to([kp, vp, KVPages(PAGE, table=table)], DEVICE)

    calls, reused = [], _ops.attend_reused
    monkeypatch.setattr(_ops, "attend_reused", lambda *a, **kw: calls.append(kw["pages"]) or reused(*a, **kw))
    got = {}
    for backend in ("reference", "triton"):
        out, m = paged_hip_attention(q.to(DEVICE), Source(), 400, config=TINY, rope=_to(rope, DEVICE), scale=0.3,
                                     cache_seqlens=kv_len.to(DEVICE), mask=_to(mask, DEVICE),
                                     refresh_stage=TINY.n_stages, backend=backend, fetch=True)
        got[backend] = out.cpu()
        torch.testing.assert_close(got[backend], want, rtol=1e-4, atol=1e-4)
    plain = reused(*_to([q, k, v, mask, kv_len], DEVICE), TINY, _to(rope, DEVICE), 0.3).cpu()
    assert torch.equal(got["triton"], plain)
    assert len(calls) == 1 and calls[0].table is not None     # the Triton step, through the table
