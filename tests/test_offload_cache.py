"""Host KV store + GPU block cache: scripted access patterns, no stale reads, FP8 error bound."""
import pytest
import torch

from infinitehip.cache.offload import FP8_MAX, FP8_REL_ERROR, BlockCache, HostKVStore, fp8_decode, fp8_encode


def filled_store(num_blocks=16, fp8=False, dtype=torch.float32):
    store = HostKVStore(num_blocks, 4, 2, 8, dtype=dtype, fp8=fp8)
    k = torch.randn(num_blocks, 4, 2, 8)
    store.write(torch.arange(num_blocks), k, -k)
    return store, k


def test_hits_misses_evictions_lru():
    store, k = filled_store()
    cache = BlockCache(store, n_slots=3)
    cache.fetch(torch.tensor([0, 1, 2]))                      # 3 misses fill the cache
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (0, 3, 0)
    cache.fetch(torch.tensor([1, 2]))                         # 2 hits; block 0 is now the oldest
    assert (cache.stats.hits, cache.stats.misses) == (2, 3)
    slots = cache.fetch(torch.tensor([3, 1]))                 # 3 misses, evicts 0 (LRU), 1 hits
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (3, 4, 1)
    assert cache.slot_of[0] == -1 and cache.slot_of[2] >= 0
    torch.testing.assert_close(cache.k[slots], k[[3, 1]])
    torch.testing.assert_close(cache.v[slots], -k[[3, 1]])
    assert cache.stats.hit_rate == pytest.approx(3 / 7)


def test_repeated_blocks_in_one_request_and_shape():
    store, k = filled_store()
    cache = BlockCache(store, n_slots=4)
    slots = cache.fetch(torch.tensor([[5, 5], [6, 5]]))
    assert slots.shape == (2, 2) and slots[0, 0] == slots[0, 1] == slots[1, 1]
    assert cache.stats.misses == 2
    torch.testing.assert_close(cache.k[slots], k[torch.tensor([[5, 5], [6, 5]])])


def test_never_stale_after_rewrite():
    store, k = filled_store()
    cache = BlockCache(store, n_slots=4)
    cache.fetch(torch.tensor([7]))
    fresh = torch.full((1, 4, 2, 8), 3.0)
    cache.write(torch.tensor([7]), fresh, fresh)
    slot = cache.fetch(torch.tensor([7]))
    assert cache.stats.misses == 2, "the rewritten block is fetched again"
    torch.testing.assert_close(cache.k[slot], fresh)


def test_too_many_blocks_is_a_clear_error():
    store, _ = filled_store()
    with pytest.raises(ValueError, match="give the block cache more slots"):
        BlockCache(store, n_slots=2).fetch(torch.tensor([0, 1, 2]))


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
