"""The model's fused CUDA steps (``models/fused.py``, Triton interpreter on CPU) against their
PyTorch statements: RMSNorm, and SiLU(gate) * up of the fused w13 output. Odd widths (padding),
several rows, a width spanning two programs; float32 tight, bfloat16 within a rounding (the
interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest)."""
import pytest
import torch
import torch.nn.functional as F

from infinitehip.models.fused import rms_norm_triton, silu_mul_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ulps(dtype):
    return 2 * torch.finfo(dtype).eps      # a rounding of either kind, relative


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 80), (2, 5, 4096)])
def test_rms_norm_is_f_rms_norm(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(DEVICE, dtype)
    want = F.rms_norm(x.float(), w.shape, w.float(), 1e-5)
    got = rms_norm_triton(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else ulps(dtype)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 2 * 100), (2, 1, 2 * 4100)])
def test_silu_mul_is_silu_times_up(shape, dtype):
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(shape, generator=g) * 4).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up                  # the two ops in the input dtype, as the model ran them
    got = silu_mul_triton(gate_up)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2 * ulps(dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_is_torch_argmax(dtype):
    """Greedy decoding's pick (``argmax_triton``, several programs a row merged by the last) ==
    ``torch.argmax``: random rows; the maximum repeated in several programs' blocks (the first
    index wins); a row of -inf (index 0); NaN above every number; a vocabulary not a multiple of
    the block; its arrival counters left zero."""
    from infinitehip.attention.triton.decode import arrival_counters
    from infinitehip.models.fused import argmax_triton

    V = 1000
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, V, generator=g).to(dtype)
    x[1, [700, 130, 999]] = 50.0                                    # ties across blocks: 130 first
    x[2] = -float("inf")
    x[3, 600] = float("nan")
    x[4, 999] = 60.0                                                # in the last, ragged block
    x = x.to(DEVICE)
    got = argmax_triton(x, block=128)
    assert got.dtype == torch.int64
    assert got.tolist() == x.argmax(-1).tolist() == [got[0].item(), 130, 0, 600, 999]
    assert not arrival_counters(5, x.device)[:5].any()


@pytest.mark.parametrize("B,T", [(2, 1), (1, 3)])
def test_write_rows_is_two_index_copies(B, T):
    """The decode cache write (one launch for K and V) from slices of a fused q/k/v output."""
    from infinitehip.attention.triton.kv_write import write_rows

    H, K, D, cap = 4, 2, 80, 16
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, H + 2 * K, D, generator=g).to(DEVICE, torch.bfloat16)
    k, v = qkv[:, :, H:H + K].flatten(0, 1), qkv[:, :, H + K:].flatten(0, 1)       # (B*T, K, D), strided
    rows = torch.tensor([3, 9, 12][:B * T], device=DEVICE)
    want_k, want_v = (torch.randn(B * cap, K, D, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    got_k, got_v = want_k.clone(), want_v.clone()
    want_k.index_copy_(0, rows, k)
    want_v.index_copy_(0, rows, v)
    write_rows(got_k, got_v, rows, k, v)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    with pytest.raises(ValueError, match="contiguous"):
        write_rows(got_k, got_v, rows, k.transpose(1, 2), v)


def _linear_reference(x, w, bias, norm, silu, residual):
    """float64 of the kernel's input rounding: RMSNorm / SiLU * up rounded to the weights' dtype."""
    if norm is not None:
        g, eps = norm
        x = F.rms_norm(x.float(), g.shape, g.float(), eps).to(w.dtype)
    elif silu:
        gate, up = x.chunk(2, dim=-1)
        x = (F.silu(gate.float()).to(w.dtype).float() * up.float()).to(w.dtype)
    out = x.double() @ w.double().t()
    if bias is not None:
        out += bias.double()
    return out + residual.double() if residual is not None else out


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["plain", "norm", "silu", "residual_bias"])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_linear_is_the_composition(kind, rows, dtype, split):
    """Decode's fused linear layer (models/gemv.py) == prologue -> x W^T + b -> + residual, for ragged
    N and K (not multiples of the tiles), over several programs and K tiles; split-K over 3 splits
    (the last ragged) merged by the last to finish, its arrival counters left zero."""
    from infinitehip.attention.triton.decode import arrival_counters
    from infinitehip.models import gemv

    N, K = 40, 300
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, 2 * K if kind == "silu" else K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(N, generator=g).to(DEVICE, dtype) if kind == "residual_bias" else None
    norm = ((torch.rand(K, generator=g) + 0.5).to(DEVICE, dtype), 1e-5) if kind == "norm" else None
    residual = torch.randn(rows, N, generator=g).to(DEVICE, dtype) if kind == "residual_bias" else None
    want = _linear_reference(x, w, bias, norm, kind == "silu", residual)
    launch = gemv.Launch(block_n=16, block_k=128, warps=4, stages=2, split=split)
    got = gemv.linear(x, w, bias, norm=norm, silu=kind == "silu",
                      residual=None if residual is None else residual.clone(), triton_kernel=True, launch=launch)
    assert got.shape == (rows, N) and got.dtype == dtype
    assert not arrival_counters(8, x.device)[:8].any()
    # float32: summation order; bfloat16: the output's rounding plus the input's (the interpreter
    # truncates where the GPU rounds), relative to the output's scale.
    tol = 1e-5 if dtype == torch.float32 else 4 * ulps(dtype)
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("triton_kernel", [True, False], ids=["kernel", "composed"])
def test_gemv_linear_scatters_k_and_v_into_cache_rows(triton_kernel):
    """The q/k/v projection's ``Scatter``: output columns [col, col + W) and [col + W, col + 2 W)
    also land in rows ``rows`` of the K and V caches, bit for bit the output (the kernel's
    epilogue, or two ``index_copy_``), and no other cache row changes; a split-K launch too."""
    from infinitehip.models import gemv

    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 64, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.randn(56, 64, generator=g).to(DEVICE, torch.bfloat16)         # q 24, k 16, v 16 columns
    for launch in (gemv.Launch(block_n=16, block_k=32, stages=2), gemv.Launch(block_n=16, block_k=32, split=2)):
        kc, vc = (torch.full((10, 16), 7.0, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        rows = torch.tensor([4, 0, 9], device=DEVICE)
        out = gemv.linear(x, w, scatter=gemv.Scatter(kc, vc, rows, col=24), triton_kernel=triton_kernel,
                          launch=launch)
        assert torch.equal(kc[rows], out[:, 24:40]) and torch.equal(vc[rows], out[:, 40:56])
        others = [r for r in range(10) if r not in rows.tolist()]
        assert (kc[others] == 7).all() and (vc[others] == 7).all()
    with pytest.raises(ValueError, match="scatter needs"):
        gemv.linear(x, w, scatter=gemv.Scatter(kc, vc, rows, col=48), triton_kernel=True)


def test_gemv_linear_writes_into_the_residual():
    from infinitehip.models import gemv

    x, w, residual = (torch.randn(shape, device=DEVICE) for shape in ((2, 32), (16, 32), (2, 16)))
    want = residual + x @ w.t()
    got = gemv.linear(x, w, residual=residual, triton_kernel=True)
    assert got.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(residual, want, rtol=1e-5, atol=1e-5)


def test_gemv_linear_takes_fewer_stages_where_shared_memory_is_short(monkeypatch):
    """The built-in model's down projection in bf16 on an H200 asked for 237,568 bytes of shared
    memory (of 232,448) with the 8B-tuned 5 stages, and `infinitehip generate builtin` crashed on
    the GPU. A launch the device refuses is retried with a stage fewer, and the count that fits
    is kept for the shape; where not even one stage fits, the device's error."""
    from triton.runtime.errors import OutOfResources

    from infinitehip.models import gemv

    class Kernel:   # compiles with at most ``fits`` stages, as a GPU with less shared memory would
        def __init__(self, fits):
            self.fits, self.tried = fits, []

        def __getitem__(self, grid):
            def launch(*args, num_stages, **kw):
                self.tried.append(num_stages)
                if num_stages > self.fits:
                    raise OutOfResources(num_stages * 48 * 1024, 100 * 1024, "shared memory")
            return launch

    x, w = torch.randn(1, 96), torch.randn(40, 96)
    monkeypatch.setattr(gemv, "_STAGES", {})
    monkeypatch.setattr(gemv, "_gemv_kernel", kernel := Kernel(fits=2))
    gemv.linear(x, w, triton_kernel=True, launch=gemv.Launch(stages=5))
    gemv.linear(x, w, triton_kernel=True, launch=gemv.Launch(stages=5))
    assert kernel.tried == [5, 4, 3, 2, 2]                    # the second call: what fits, remembered
    monkeypatch.setattr(gemv, "_gemv_kernel", Kernel(fits=0))
    with pytest.raises(OutOfResources):
        gemv.linear(x, torch.randn(24, 96), triton_kernel=True, launch=gemv.Launch(stages=2))


def test_gemv_linear_rejects_bad_shapes():
    from infinitehip.models import gemv

    w = torch.randn(16, 32, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        gemv.linear(torch.randn(2, 31, device=DEVICE), w)
    with pytest.raises(ValueError, match="does not fit"):
        gemv.linear(torch.randn(2, 32, device=DEVICE), w, silu=True)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv.linear(torch.randn(17, 32, device=DEVICE), w, triton_kernel=True)


def test_pdl_is_off_by_default_and_off_hopper(monkeypatch):
    """Programmatic dependent launch is off unless switched on (``pdl.USE``, the benchmarks' A/B),
    and then only where the hardware has it (CPU interpreter: never)."""
    from infinitehip.attention.triton import pdl

    assert not pdl.USE and not any(pdl.enabled(d) for d in _devices())
    monkeypatch.setattr(pdl, "USE", True)
    assert not pdl.enabled(torch.device("cpu")) and pdl.launch_options(torch.device("cpu")) == {}
    if torch.cuda.is_available():
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        assert pdl.enabled(torch.device("cuda")) == (hopper and pdl._HAVE_GDC)


def _devices():
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PDL needs a GPU (Hopper+)")
def test_gemv_chain_with_pdl_in_a_cuda_graph_equals_the_chain_without(monkeypatch):
    """A decode-like chain of GEMVs (norm, residual, SiLU prologues, a split-K one) launched with
    PDL, captured in a CUDA graph and replayed, gives bit-for-bit the outputs of the same launches
    without PDL: each kernel waits for its predecessor first. (On a GPU without PDL both chains
    run without it.)"""
    from infinitehip.attention.triton import pdl
    from infinitehip.models import gemv

    g = torch.Generator(device="cuda").manual_seed(3)
    C, I = 512, 1024
    ws = [(torch.randn(n, k, generator=g, device="cuda") / k ** 0.5).bfloat16()
          for n, k in ((C, C), (2 * I, C), (C, I))] * 3
    norm = ((torch.rand(C, generator=g, device="cuda") + 0.5).bfloat16(), 1e-5)
    x0 = torch.randn(2, C, generator=g, device="cuda").bfloat16()

    def chain(x, use_pdl):
        monkeypatch.setattr(pdl, "USE", use_pdl)
        x = x.clone()
        for i in range(0, len(ws), 3):
            kw = dict(triton_kernel=True)
            x = gemv.linear(gemv.linear(x, ws[i], norm=norm, **kw), ws[i], residual=x, **kw)
            h = gemv.linear(x, ws[i + 1], norm=norm, launch=gemv.Launch(block_n=64, stages=3), **kw)
            x = gemv.linear(h, ws[i + 2], silu=True, residual=x, launch=gemv.Launch(split=2), **kw)
        return x

    want = chain(x0, use_pdl=False)
    static = x0.clone()
    out = chain(static, use_pdl=True)               # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static, use_pdl=True)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
