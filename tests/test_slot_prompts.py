"""Context caching in the batch runner's slots (engine/slot_prompts.py): a prompt's KV stays in its
slot and the next request sharing its prefix starts from it -- the tokens of a run of its own,
nothing copied to host memory."""
import pytest

pytest.importorskip("transformers")
from checkpoints import make_checkpoint  # noqa: E402
from test_batch import GREEDY, alone, drive, prompt, runner  # noqa: E402

import infinitehip  # noqa: E402
from infinitehip.cache.offload_plan import OffloadConfig  # noqa: E402
from infinitehip.engine import PrefixCache, SamplingParams, stream  # noqa: E402

DOC = prompt(300, seed=1)
LONG = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return infinitehip.load(make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama"), config="tiny")


def cache():
    return PrefixCache(block_tokens=64, min_tokens=64)


# Slots on the device, offloaded to host memory (bf16: the on-device tokens), offloaded in FP8.
STORES = {"device": False, "offload": OffloadConfig(), "offload_fp8": OffloadConfig(fp8=True)}


def alone_in(model, store, ids, params=GREEDY):
    """``alone`` with the runner's storage (offloading in bf16 gives the on-device tokens)."""
    if store != "offload_fp8":
        return alone(model, ids, params)
    return [e.token for e in stream(model, [ids], params, chunk_size=64, offload=STORES[store])]


@pytest.mark.parametrize("store", STORES)
def test_the_next_question_starts_from_the_slot_that_holds_the_document(model, store):
    """While its slot was free, other requests' decode steps wrote a throwaway token at its
    position 0 (written back before reuse: else the answer differs; offloaded in FP8 that write
    re-encodes the whole page)."""
    pc = cache()
    r = runner(model, prefix_cache=pc, offload=STORES[store])
    asks = [DOC + prompt(9, seed=2), DOC + prompt(13, seed=3)]
    first, _ = drive(r, {0: [(0, asks[0], GREEDY), (9, prompt(50, seed=9), LONG)]})   # 9 decodes longer
    assert r.n_slot_prompts == 1 and len(pc) == 0          # the document kept in its slot (not the 50
    # tokens: under min_tokens), nothing copied to host memory
    prefilled = r.stats.prefilled_tokens
    second, _ = drive(r, {0: [(1, asks[1], GREEDY)]})
    assert [first[0], second[1]] == [alone_in(model, store, q) for q in asks]
    assert first[9] == alone_in(model, store, prompt(50, seed=9), LONG)
    assert pc.stats.hits == 1 and r.stats.reused_tokens == 256
    assert r.stats.prefilled_tokens - prefilled == len(asks[1]) - 256


@pytest.mark.parametrize("store", STORES)
def test_a_document_in_a_busy_slot_is_copied_into_a_free_one(model, store):
    pc = cache()
    r = runner(model, prefix_cache=pc, offload=STORES[store])
    asks = [DOC + prompt(9, seed=2), DOC + prompt(13, seed=3)]
    got, _ = drive(r, {0: [(0, asks[0], LONG)], 12: [(1, asks[1], GREEDY)]})   # the first still decoding
    assert got == {0: alone_in(model, store, asks[0], LONG), 1: alone_in(model, store, asks[1])}
    assert pc.stats.hits == 1 and r.stats.reused_tokens == 256 and len(pc) == 0


def test_the_slot_freed_longest_ago_is_overwritten_first(model):
    pc = cache()
    r = runner(model, max_batch=2, prefix_cache=pc)
    a, b = prompt(200, seed=4), prompt(220, seed=5)
    drive(r, {0: [(0, a, GREEDY)], 1: [(1, b, GREEDY)]})    # a is released first
    drive(r, {0: [(2, prompt(180, seed=6), GREEDY)]})       # unrelated: takes a's slot
    got, _ = drive(r, {0: [(3, b + prompt(5, seed=7), GREEDY)], 1: [(4, a + prompt(5, seed=8), GREEDY)]})
    assert got == {3: alone(model, b + prompt(5, seed=7)), 4: alone(model, a + prompt(5, seed=8))}
    assert pc.stats.hits == 1 and r.stats.reused_tokens == 192      # b's blocks; a's were overwritten


def test_abort_forgets_the_prompts_of_the_slots_it_frees(model):
    r = runner(model, max_batch=2, prefix_cache=cache())
    drive(r, {0: [(0, DOC, GREEDY)]})
    r.add(prompt(250, seed=5), LONG)
    for _ in range(6):
        r.step()
    r.abort()
    assert r.n_slot_prompts == 1                             # the finished one's, not the aborted one's


@pytest.mark.parametrize("store", ["device", "offload"])
def test_kept_prompts_go_to_the_host_entries_and_a_file(model, tmp_path, store):
    """``serve --context-cache`` saves the prompts the slots hold (ModelEngine.save_context_cache)."""
    pc = cache()
    r = runner(model, prefix_cache=pc, offload=STORES[store])
    ask = DOC + prompt(9, seed=2)
    drive(r, {0: [(0, ask, GREEDY), (3, prompt(40, seed=9), LONG)]})    # 3 decodes longer: position 0 overwritten
    r.keep_prompts()
    assert len(pc) == 1
    pc.save(tmp_path / "ctx.safetensors", owner=r.owner)
    fresh = cache()
    fresh.load(tmp_path / "ctx.safetensors", owner=r.owner)
    again = runner(model, prefix_cache=fresh, offload=STORES[store])
    got, _ = drive(again, {0: [(0, DOC + prompt(13, seed=3), GREEDY)]})
    assert got[0] == alone(model, DOC + prompt(13, seed=3)) and fresh.stats.hits == 1


def test_a_failed_copy_from_a_busy_slot_is_aborted_and_its_target_forgotten(model, monkeypatch):
    """The copy from a busy slot ran before the request was the one prefilling: a step failing
    there lost it (abort() did not name it: its client waited forever), and the free slot it was
    copied into kept its old prompt, some layers overwritten (served to the next request)."""
    from infinitehip.cache import KVCache

    r = runner(model, max_batch=2, prefix_cache=cache())
    old = prompt(200, seed=4)
    drive(r, {0: [(0, old, GREEDY)]})                        # slot 0 holds `old`
    busy = r.add(DOC + prompt(9, seed=2), SamplingParams(max_new_tokens=100, ignore_eos=True))
    for _ in range(8):                                       # slot 1: the document, decoding
        r.step()
    copy = KVCache.copy_prefix

    def failing(kv, src, dst, n):                            # the first layer's K copied, then a failure
        kv._rows(kv.k[0])[dst, :n] = kv._rows(kv.k[0])[src, :n]
        raise RuntimeError("injected")
    monkeypatch.setattr(KVCache, "copy_prefix", failing)
    asked = r.add(DOC + prompt(13, seed=3), GREEDY)
    with pytest.raises(RuntimeError, match="injected"):
        r.step()
    monkeypatch.setattr(KVCache, "copy_prefix", copy)
    assert sorted(r.abort()) == [busy, asked] and r.n_free == 2
    got, _ = drive(r, {0: [(1, old + prompt(5, seed=8), GREEDY)]})
    assert got[1] == alone(model, old + prompt(5, seed=8))


def test_a_slot_holding_as_much_as_a_host_entry_is_reused_without_a_host_copy(model, tmp_path):
    """With the document also in the prefix cache (a --context-cache file), a tie went to the host
    entry: every question copied the document from host memory, the copy slot prompts avoid."""
    pc = cache()
    r = runner(model, prefix_cache=pc)
    drive(r, {0: [(0, DOC + prompt(9, seed=2), GREEDY)]})
    r.keep_prompts()                                         # the document is in both, 256 tokens each
    copied, reuse = [], pc.reuse
    pc.reuse = lambda *a, **k: copied.append(reuse(*a, **k)) or copied[-1]
    ask = DOC + prompt(13, seed=3)
    got, _ = drive(r, {0: [(1, ask, GREEDY)]})
    assert got[1] == alone(model, ask) and r.stats.reused_tokens == 256 and copied in ([], [0])


def test_of_two_slots_holding_the_document_the_free_one_is_reused_in_place(model, monkeypatch):
    """The busy one came first (the lowest slot) and was copied from, where the free one held as much."""
    r = runner(model, prefix_cache=cache())
    asks = [DOC + prompt(9, seed=2), DOC + prompt(13, seed=3), DOC + prompt(7, seed=4)]
    got, _ = drive(r, {0: [(0, asks[0], LONG)], 2: [(1, asks[1], GREEDY)]})   # 1 copies from 0, ends first
    monkeypatch.setattr(r.cache, "copy_prefix", lambda *a: pytest.fail("copied from the busy slot"))
    r.add(asks[0], LONG)                                                         # slot 0 busy again ...
    for _ in range(3):
        r.step()
    more, _ = drive(r, {0: [("third", asks[2], GREEDY)]})                      # ... slot 1 free: in place
    assert more["third"] == alone(model, asks[2])


def test_a_prompt_past_the_dense_cutoff_does_not_reuse_a_dense_prefilled_slot(model):
    """A slot's prompt under the cutoff was prefilled densely; a longer prompt sharing its start is
    prefilled sparsely in every chunk, so it starts from nothing (else its tokens differ from
    alone's), and a second long one from the first."""
    cut = infinitehip.load(model.path, config=model.hip.replace(dense_threshold=400, model_context_length=4096))
    assert cut.net.dense_cutoff == 400
    doc = prompt(300, seed=1)
    asks = [doc + prompt(9, seed=2), doc + prompt(150, seed=3), doc + prompt(150, seed=3) + prompt(9, seed=4)]
    pc = cache()
    r = runner(cut, prefix_cache=pc, max_context=600)
    got = {}
    for i, ask in enumerate(asks):
        got.update(drive(r, {0: [(i, ask, GREEDY)]})[0])
    # (The first is not alone's: the runner decodes every row sparsely, alone decodes it densely.)
    assert [got[1], got[2]] == [alone(cut, asks[1]), alone(cut, asks[2])]
    assert pc.stats.hits == 1 and r.stats.reused_tokens == 448   # only the third, from the second
