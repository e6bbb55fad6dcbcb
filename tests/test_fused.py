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
