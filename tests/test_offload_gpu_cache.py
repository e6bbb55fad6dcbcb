"""The GPU page cache (``OffloadConfig(decode_cache=True)``, ``gpu_pages.PageCache``): scripted
access patterns over units (one page of one kv head: hits, misses, LRU evictions, units needed
every call stay, duplicates) under both fetch plans (PyTorch, and the one-launch Triton kernel
through the interpreter on CPU), the two plans state for state on random traffic, no stale unit
after decode writes (bf16, FP8), the masked copy kernel, the one-launch decode write (plain, and
FP8 against the PyTorch re-encode), config. The Triton kernels run on the GPU where there is one."""
import pytest
import torch

from infinitehip import HiPConfig
from infinitehip.attention.triton import page_cache
from infinitehip.attention.triton.page_cache import copy_units_cuda
from infinitehip.cache import gpu_pages
from infinitehip.cache.gpu_pages import PageCache
from infinitehip.cache.offload import HostKVStore
from infinitehip.cache.offload_kv import OffloadKVCache
from infinitehip.cache.offload_plan import OffloadConfig

CONFIG = HiPConfig.preset("tiny", refresh_intervals=(8, 4, 2))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"    # where the Triton kernels run (else interpreted)


@pytest.fixture(params=["torch", "triton"])
def plan(request, monkeypatch):
    """Run a test under each fetch plan (on CPU ``fetch`` takes ``gpu_pages.plan_fetch``; on a GPU
    machine these CPU caches keep the PyTorch plan, and the Triton one runs on the GPU below)."""
    if request.param == "triton" and DEVICE == "cuda":
        pytest.skip("the Triton plan over CPU tensors needs the interpreter")
    if request.param == "triton":
        monkeypatch.setattr(gpu_pages, "plan_fetch", page_cache.plan_fetch_cuda)
    return request.param


def filled_store(num_blocks=16, fp8=False, dtype=torch.float32, device=None):
    """A store of random pages (host memory; its device alias on ``device``), and its keys."""
    store = HostKVStore(num_blocks, 4, 2, 8, dtype=dtype, fp8=fp8, device=device)
    k = torch.randn(num_blocks, 4, 2, 8)
    store.write(torch.arange(num_blocks), k, -k)
    return store, k


def fetch(cache: PageCache, units: torch.Tensor) -> torch.Tensor:
    """Fetch, then the slots holding the units."""
    cache.fetch(units)
    return cache.slots(units)


def counts(cache):
    return tuple(cache.counts.tolist())


def of_units(x: torch.Tensor, units) -> torch.Tensor:
    """Pages of x (pages, page, K, D) cut into units: (n, page, 1, D), unit u = page u // K, head u % K."""
    units = torch.as_tensor(units)
    K = x.shape[2]
    return x[units // K, :, units % K][:, :, None]


def check_coherent(cache: PageCache):
    """Every resident unit holds what the store would give now; the table agrees with the owners."""
    held = (cache.owner[:cache.n_slots] >= 0).nonzero().flatten()
    units = cache.owner[held]
    assert torch.equal(cache.slot_of[units].long(), held)
    assert int((cache.slot_of[:cache.num_units] >= 0).sum()) == held.numel()
    k, v = cache.store.read(torch.arange(cache.store.k.shape[0]))
    assert torch.equal(cache.k[held], of_units(k, units)) and torch.equal(cache.v[held], of_units(v, units))


def test_hits_misses_evictions_lru(plan):
    store, k = filled_store()
    cache = PageCache(store, n_slots=3)
    cache.fetch(torch.tensor([0, 1, 2]))                      # 3 misses fill the cache
    assert counts(cache) == (0, 3, 0)
    cache.fetch(torch.tensor([1, 2]))                         # 2 hits; page 0 is now the oldest
    assert counts(cache) == (2, 3, 0)
    slots = fetch(cache, torch.tensor([3, 1]))                 # 3 misses, evicts 0 (LRU), 1 hits
    assert counts(cache) == (3, 4, 1) and int(cache.step) == 3
    assert cache.slot_of[0] == -1 and cache.slot_of[2] >= 0
    torch.testing.assert_close(cache.k[slots], of_units(k, [3, 1]))
    torch.testing.assert_close(cache.v[slots], -of_units(k, [3, 1]))
    assert cache.stats.hit_rate == pytest.approx(3 / 7)
    check_coherent(cache)


def test_lru_order_and_pages_needed_every_call_stay(plan):
    """Page 0 (a sink) and page 1 (a window) are needed every call; the others rotate through
    the 2 remaining slots, each evicting the least recently used."""
    store, k = filled_store()
    cache = PageCache(store, n_slots=4)
    first = fetch(cache, torch.tensor([0, 1, 2, 3]))
    for step, new in enumerate(range(4, 12)):
        slots = fetch(cache, torch.tensor([0, 1, new, -1]))
        assert torch.equal(slots[:2], first[:2]), "sink and window pages are never evicted"
        assert slots[3] == -1
        torch.testing.assert_close(cache.k[slots[:3]], of_units(k, [0, 1, new]))
        if step >= 1:                                      # the page fetched two calls ago is gone
            assert cache.slot_of[new - 2] == -1 and cache.slot_of[new - 1] >= 0
    assert counts(cache) == (2 * 8, 4 + 8, 8)
    check_coherent(cache)


def test_duplicates_allocate_one_slot_and_shape(plan):
    store, k = filled_store()
    cache = PageCache(store, n_slots=4)
    needed = torch.tensor([[5, 5], [6, 5]])
    slots = fetch(cache, needed)
    assert slots.shape == (2, 2) and slots[0, 0] == slots[0, 1] == slots[1, 1] != slots[1, 0]
    assert counts(cache) == (0, 2, 0) and int((cache.owner >= 0).sum()) == 2
    torch.testing.assert_close(cache.k[slots], of_units(k, needed.flatten()).view(2, 2, 4, 1, 8))
    cache.fetch(torch.tensor([5, 5, 5, 6]))
    assert counts(cache) == (2, 2, 0)


def test_too_wide_a_request_is_a_clear_error():
    store, _ = filled_store()
    with pytest.raises(ValueError, match="give it more"):
        PageCache(store, n_slots=2).fetch(torch.tensor([0, 1, 1]))


def test_invalidated_page_is_fetched_again(plan):
    store, k = filled_store()
    cache = PageCache(store, n_slots=4)
    cache.fetch(torch.tensor([14, 15, 16]))                  # page 7 (both heads), page 8 head 0
    fresh = torch.full((1, 4, 2, 8), 3.0)
    store.write(torch.tensor([7]), fresh, fresh)
    cache.invalidate(torch.tensor([[7, 7]]))                 # a page: both of its units
    slot = fetch(cache, torch.tensor([15, 16]))
    assert counts(cache) == (1, 4, 0), "the rewritten page's unit is fetched again, the other hits"
    torch.testing.assert_close(cache.k[slot[0]], fresh[0, :, :1])
    check_coherent(cache)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_decode_writes_keep_resident_units_fresh(fp8, plan):
    """Decode writes (T = 1) into resident units, rows mid-page / at a page's end / on a fresh page,
    also through a ``select`` view; a prefill rewrite (T > 1) invalidates. Never stale."""
    B, K, D, nb = 3, 2, 8, 8
    cache = OffloadKVCache(1, B, nb * 8, K, D, dtype=torch.bfloat16, device="cpu", layer_configs=[CONFIG],
                           config=OffloadConfig(fp8=fp8, decode_cache=True))
    gpu = cache.caches[0]
    g = torch.Generator().manual_seed(0)
    kv = lambda n, t: [torch.randn(n, t, K, D, generator=g).bfloat16() for _ in range(2)]   # noqa: E731
    cache.update(0, torch.zeros(B, dtype=torch.long), *kv(B, 20))
    every = torch.arange(B * nb * K)
    gpu.fetch(every)
    starts = torch.tensor([20, 23, 32])
    for s in range(10):
        view, first = (cache, 0) if s % 3 else (cache.select(slice(1, 3)), 1)
        view.update(0, starts[first:] + s, *kv(B - first, 1))
        check_coherent(gpu)
        gpu.fetch(every)
        assert gpu.counts[1] == B * nb * K, "decode writes never force a re-fetch"
    cache.update(0, torch.tensor([4, 0, 9]), *kv(B, 6))                       # prefill-like rewrite
    gpu.fetch(every)
    check_coherent(gpu)
    assert gpu.counts[1] > B * nb * K


def state(cache):
    S, P = cache.n_slots, cache.num_units
    return [t.clone() for t in (cache.slot_of[:P], cache.owner[:S], cache.stamp[:S], cache.step, cache.counts)]


@pytest.mark.parametrize("n_slots,width,num_blocks,seed", [(12, 9, 32, 0), (40, 33, 32, 1), (7, 7, 32, 2),
                                                           (5004, 3336, 4096, 3)])   # Llama-3-8B's at 256K
def test_triton_plan_is_the_torch_plan(n_slots, width, num_blocks, seed):
    """Random traffic (duplicates, -1 entries, invalidations, shifting working sets): both plans
    leave the same table, owners, stamps and counters and return the same slots and copies."""
    g = torch.Generator().manual_seed(seed)
    store, _ = filled_store(num_blocks=num_blocks, device=DEVICE)
    caches = [PageCache(store, n_slots, DEVICE), PageCache(store, n_slots, DEVICE)]
    units, spread = 2 * num_blocks, max(6, width // 2)
    for step in range(30):
        hot = torch.randint(0, units, (1,), generator=g).item()
        pages = (hot + torch.randint(-spread, spread + 1, (width,), generator=g)).clamp(-1, units - 1)   # repeats
        pages[torch.rand(width, generator=g) < 0.1] = -1
        if step % 9 == 8:
            pages[:] = -1                                       # a plan of no entry: every entry -1
        if step % 7 == 6:
            for c in caches:
                c.invalidate(pages[:2].clamp(min=0) // 2)
        pages = pages.to(DEVICE)
        order = list(dict.fromkeys(u for u in pages.tolist() if u >= 0))         # distinct, first-entry order
        absent = [u for u in order if int(caches[0].slot_of[u]) < 0]
        (src, dst, n), (src2, dst2, n2) = (gpu_pages.plan_fetch(caches[0], pages.clone()),
                                           page_cache.plan_fetch_cuda(caches[1], pages.clone()))
        n = int(n)
        assert n == int(n2) and src[:n].tolist() == absent, "the copies: the absent units, in entry order"
        assert torch.equal(src[:n], src2[:n]) and torch.equal(dst[:n], dst2[:n])
        assert torch.equal(caches[0].slots(src[:n]), dst[:n])
        for a, b in zip(state(caches[0]), state(caches[1])):
            assert torch.equal(a, b), step
    assert caches[0].counts[2] > 0, "the traffic evicts"


@pytest.mark.parametrize("programs", [None, 1, 2])
@pytest.mark.parametrize("dtype,fp8", [(torch.bfloat16, False), (torch.float32, True)])
def test_copy_kernel_copies_the_first_n(dtype, fp8, programs):
    """The CUDA copy (Triton interpreter here): the first n listed units get their decoded K and V, the
    rest is untouched, however many programs share the copies. (bf16 FP8 decode is not compared
    here: the interpreter truncates float32 -> bf16.)"""
    store, _ = filled_store(fp8=fp8, dtype=dtype, device=DEVICE)
    k_pool = torch.full((6, 4, 1, 8), 7.0, dtype=dtype, device=DEVICE)
    v_pool = torch.full((6, 4, 1, 8), 8.0, dtype=dtype, device=DEVICE)
    index = lambda *x: torch.tensor(x, device=DEVICE)   # noqa: E731
    copy_units_cuda(store.dk, store.dk_scale if fp8 else None, store.dv, store.dv_scale if fp8 else None,
                    k_pool, v_pool, index(7, 2, 11, 9, -1), index(0, 4, 3, 2, 5), index(3).int(),
                    programs=programs)                                                  # 3 copies of 5
    k, v = store.read(torch.arange(16), DEVICE)
    assert torch.equal(k_pool[[0, 4, 3]], of_units(k, [7, 2, 11]))
    assert torch.equal(v_pool[[0, 4, 3]], of_units(v, [7, 2, 11]))
    assert (k_pool[[1, 2, 5]] == 7.0).all() and (v_pool[[1, 2, 5]] == 8.0).all()


def test_decode_cache_is_validated():
    OffloadConfig(decode_cache=True)
    with pytest.raises(ValueError, match=r"decode_cache='gpu'.*False.*True"):
        OffloadConfig(decode_cache="gpu")


@pytest.mark.parametrize("field, bad, message", [
    ("page", 6, "power of two"), ("page", 0, "power of two"), ("page", -8, "power of two"), ("page", 8.0, "power"),
    ("fp8", "yes", "False .* or True"), ("gpu_pages", 0, "positive"), ("gpu_pages", 2.5, "positive"),
    ("headroom", 0.5, ">= 1"), ("headroom", float("nan"), ">= 1"), ("headroom", float("inf"), "finite"),
    ("gpu_layers", -1, ">= 0"),
])
def test_offload_config_fields_are_validated(field, bad, message):
    """Each field's bad value is a ValueError naming it (a page of 6 tokens failed deep inside
    prefill with a tensor view error; a page of 0 with a ZeroDivisionError)."""
    with pytest.raises(ValueError, match=rf"OffloadConfig\.{field}=.*{message}"):
        OffloadConfig(**{field: bad})


def test_probe_stride_is_validated():
    assert OffloadConfig(probe_stride=0).capacity_unit == 8 and OffloadConfig(page=4).capacity_unit == 16
    for bad in (12, -16, 16.0):
        with pytest.raises(ValueError, match=r"probe_stride=.*power of two"):
            OffloadConfig(probe_stride=bad)


def same_fp8(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal FP8 codes; under the Triton interpreter also where its float32 -> e4m3 cast loses the
    carry into the next binade (-127.9 gives -64 instead of -128; the GPU's cvt rounds right)."""
    if DEVICE == "cuda":
        return torch.equal(want.view(torch.uint8), got.view(torch.uint8))
    w, g = want.float(), got.float()
    carry = (w == 2 * g) & (w.abs().log2() == w.abs().log2().round())
    return bool(((w == g) | carry).all())


@pytest.mark.parametrize("page", [8, 32])       # pages shorter and longer than the probe stride (16)
@pytest.mark.parametrize("fp8", [False, True], ids=["plain", "fp8"])
@pytest.mark.parametrize("cached", [False, True], ids=["store", "store+page_cache"])
def test_decode_write_kernel_is_the_torch_path(cached, fp8, page):
    """The one-launch decode write (float32, so that the interpreter's bf16 truncation cannot
    differ) leaves the store as the PyTorch path does (FP8: the re-encode's codes and scales), and
    the resident units holding it: rows mid-page, at a page's end and on a fresh page; both start
    each step from the same state."""
    from infinitehip.attention.triton.kv_write import write_decode_tokens

    B, K, D, nb = 3, 2, 8, 64 // page
    g = torch.Generator().manual_seed(5)
    caches = [OffloadKVCache(1, B, nb * page, K, D, dtype=torch.float32, device=device, layer_configs=[CONFIG],
                             config=OffloadConfig(page=page, fp8=fp8, decode_cache=cached))
              for device in ("cpu", DEVICE)]
    prompt = torch.randn(B, 20, K, D, generator=g) * 3
    caches[0].update(0, torch.zeros(B, dtype=torch.long), prompt, -prompt)
    if cached:
        caches[0].caches[0].fetch(torch.arange(B * nb * K)[::2])                  # half the units resident
    starts = torch.tensor([20, 23, 32])
    want, got = caches[0].stores[0], caches[1].stores[0]
    for s in range(3):
        for name in ("dk", "dv", "dk_probe", "dk_scale", "dv_scale") if fp8 else ("dk", "dv", "dk_probe"):
            getattr(got, name).copy_(getattr(want, name))
        if cached:
            for name in ("k", "v", "slot_of", "owner", "stamp"):
                getattr(caches[1].caches[0], name).copy_(getattr(caches[0].caches[0], name))
        k, v = torch.randn(B, 1, K, D, generator=g) * (s + 1), torch.randn(B, 1, K, D, generator=g)
        caches[0].update(0, starts + s, k, v)                                          # PyTorch path (CPU)
        w = caches[1].plan_write((starts + s).to(DEVICE), 1)
        write_decode_tokens(got, caches[1].caches[0], w.pages, w.offsets, k[:, 0].to(DEVICE), v[:, 0].to(DEVICE))
        if fp8:
            assert same_fp8(want.dk, got.dk.cpu()) and same_fp8(want.dv, got.dv.cpu())
            assert torch.equal(want.dk_scale, got.dk_scale.cpu()) and torch.equal(want.dv_scale, got.dv_scale.cpu())
        else:
            assert torch.equal(want.dk, got.dk.cpu()) and torch.equal(want.dv, got.dv.cpu())
        for store in (want, got):   # the probe copy: the keys at every multiple of its stride, both paths
            keys = store.dk.view(-1, K, D)[::store.probe_stride].cpu()
            assert (same_fp8 if fp8 else torch.equal)(keys, store.dk_probe[:-1].cpu())   # [-1]: the dump row
        if cached:   # every resident unit holds its store page decoded, in both
            check_coherent(caches[0].caches[0])
            check_coherent(caches[1].caches[0])


def test_fp8_writes_ignore_what_an_earlier_request_left():
    """A batch slot's earlier request leaves large keys past a new, shorter sequence: FP8 writes
    zero what lies past their token, so the new sequence's codes and scales are a fresh cache's
    (a prefill chunk ending mid-page, then decode writes: the PyTorch path, and on the CPU the
    kernel under the interpreter)."""
    from infinitehip.attention.triton.kv_write import write_decode_tokens

    g = torch.Generator().manual_seed(11)
    make = lambda: OffloadKVCache(1, 1, 32, 2, 8, dtype=torch.float32, device="cpu", layer_configs=[CONFIG],  # noqa: E731
                                  config=OffloadConfig(page=8, fp8=True, decode_cache=False, probe_stride=0))
    clean, used, kernel = make(), make(), make()
    junk = torch.randn(1, 32, 2, 8, generator=g) * 50
    prompt = torch.randn(1, 13, 2, 8, generator=g)                            # pages 0 and 1 (5 of 8 rows)
    for c in (clean, used, kernel):
        if c is not clean:
            c.update(0, torch.zeros(1, dtype=torch.long), junk, junk)        # the earlier request
        c.update(0, torch.zeros(1, dtype=torch.long), prompt, prompt)
    for pos in (13, 14):
        tok = torch.randn(1, 1, 2, 8, generator=g)
        for c in (clean, used):
            c.update(0, torch.tensor([pos]), tok, tok)                        # CPU: the PyTorch path
        if DEVICE == "cpu":                                                   # the kernel, interpreted
            w = kernel.plan_write(torch.tensor([pos]), 1)
            write_decode_tokens(kernel.stores[0], None, w.pages, w.offsets, tok[:, 0], tok[:, 0])
    want = clean.stores[0]
    for c in (used, kernel) if DEVICE == "cpu" else (used,):
        s = c.stores[0]
        assert torch.equal(s.dk_scale[:2], want.dk_scale[:2]) and torch.equal(s.dv_scale[:2], want.dv_scale[:2])
        assert same_fp8(want.dk[:2], s.dk[:2]) and same_fp8(want.dv[:2], s.dv[:2])
def test_fp8_decode_write_rewrites_a_page_only_when_its_scale_changes():
    """A token in a fresh slot that does not raise its page's scale is the only row written (the
    re-encode would give the other rows' codes back unchanged); one that raises it re-encodes the
    page. Seen through a poisoned resident copy, which only a re-encode reads: the host codes of
    the other rows stay as they were, then take the poison."""
    from infinitehip.attention.triton.kv_write import write_decode_tokens

    page = 8
    cache = OffloadKVCache(1, 1, 4 * page, 1, 8, dtype=torch.float32, device=DEVICE, layer_configs=[CONFIG],
                           config=OffloadConfig(page=page, fp8=True, decode_cache=True, probe_stride=0))
    g = torch.Generator().manual_seed(8)
    prompt = torch.randn(1, 5, 1, 8, generator=g).to(DEVICE)
    cache.update(0, torch.zeros(1, dtype=torch.long, device=DEVICE), prompt, prompt)
    store, pool = cache.stores[0], cache.caches[0]
    pool.fetch(torch.tensor([0], device=DEVICE))                              # page 0 resident
    pool.k[pool.slot_of[0], 0] = 1000.0                                        # poison row 0 of its copy
    codes, scale = store.dk[0].clone(), store.dk_scale[0].clone()

    def write(pos, x):
        w = cache.plan_write(torch.tensor([pos], device=DEVICE), 1)
        write_decode_tokens(store, pool, w.pages, w.offsets, x, x)

    small = prompt[:, 0] * 0.5                                                 # (1, 1, 8): within the page's max
    write(5, small)
    assert torch.equal(store.dk_scale[0], scale)
    assert torch.equal(store.dk[0, :5].float(), codes[:5].float())            # rows 0-4 untouched
    assert same_fp8((small[0].cpu() / scale[0].cpu()).to(torch.float8_e4m3fn), store.dk[0, 5].cpu())
    write(6, small * 100)                                                      # raises the scale
    assert not torch.equal(store.dk_scale[0], scale)
    assert store.dk[0, 0].float().abs().max() == 448                           # the poison, re-encoded


@pytest.mark.parametrize("sharing,tq,limit", [("kv", 1, True), ("all", 1, True), ("kv", 40, False)])
def test_needed_units_kernel_is_the_torch_statement(sharing, tq, limit):
    """The one-launch needed units (sink, window and selected (page, kv head) units of a mask, as
    the store's global ids) equal ``needed_units``, entry for entry: decode and two query blocks,
    sentinel chunks, pages past the row's end; the window reaches ``lookahead`` tokens past the
    last query (the steps that reuse the mask fetch nothing)."""
    from infinitehip.attention.mask import SENTINEL, geometry, lookahead
    from infinitehip.attention.stages import n_groups
    from infinitehip.cache.offload_kv import needed_units

    cfg, K, page = CONFIG.replace(head_sharing=sharing), 4, 4
    kv_len = torch.tensor([700, 333])
    geo = geometry(kv_len - tq, tq, kv_len, cfg)
    G, nqb = n_groups(cfg, K), geo.p0.shape[1]
    g = torch.Generator().manual_seed(7)
    starts = torch.randint(0, 90, (2, G, nqb, cfg.n_selected), generator=g) * cfg.chunk_size
    starts[torch.rand(starts.shape, generator=g) < 0.2] = SENTINEL
    kw = dict(row0=3, nb=100) if limit else {}      # row 0's window lies past page 100: cut
    want = needed_units(starts, geo, cfg, page, K, **kw)
    dev = lambda x: x.to(DEVICE)   # noqa: E731
    geo_d = type(geo)(**{f: dev(getattr(geo, f)) for f in geo.__dataclass_fields__})
    got = page_cache.needed_units_cuda(dev(starts), geo_d, cfg, page, K, **kw).cpu()
    assert got.shape == want.shape and torch.equal(got, want)
    assert (want == -1).any() and (want >= 0).any()
    if limit:
        assert want.max() < (3 + 2) * 100 * K and want[want >= 0].min() >= 3 * 100 * K
        assert (needed_units(starts, geo, cfg, page, K) >= 100 * K).any(), "the limit must cut something"
    # The window's units: every page up to (last query + lookahead) // page, for each kv head.
    last = geo.q_pos.masked_fill(~geo.q_valid, -1).amax(-1)[0, -1].item()
    row0 = 3 * 100 if limit else 0
    for p in range(last // page, (last + lookahead(cfg)) // page + 1):
        if not limit or p < 100:
            assert ((row0 + p) * K in want[0].tolist()), p
    assert ((row0 + (last + lookahead(cfg)) // page + 1) * K) not in want[0].tolist() or tq > 1
