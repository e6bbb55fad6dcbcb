"""The host KV store: FP8 error bound and round trips (the GPU page cache: test_offload_gpu_cache.py)."""
import torch

from infinitehip.cache.offload import FP8_MAX, FP8_REL_ERROR, fp8_decode, fp8_encode

from test_offload_gpu_cache import filled_store   # the same random store


def test_fp8_round_trip_within_documented_bound():
    x = torch.randn(8, 16, 2, 64) * torch.logspace(-3, 2, 8)[:, None, None, None]
    codes, scale = fp8_encode(x)
    y = fp8_decode(codes, scale, torch.float32)
    amax = x.abs().amax(dim=(1, 3), keepdim=True)
    bound = FP8_REL_ERROR * x.abs() + amax / FP8_MAX * 2.0 ** -10
    assert ((x - y).abs() <= bound + 1e-12).all()
    assert (x - y).abs().max() > 0, "fp8 is lossy: the check above must be able to fail"


def test_fp8_store_halves_memory_and_reads_back():
    store, k = filled_store(fp8=True, dtype=torch.bfloat16)
    plain, _ = filled_store(dtype=torch.bfloat16)
    assert store.nbytes < 0.6 * plain.nbytes
    got, _ = store.read(torch.tensor([2, 3]))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), k[[2, 3]], rtol=0.07, atol=0.01)
