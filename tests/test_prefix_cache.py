"""Context caching: a shared document is prefilled once; answers are unchanged."""
import pytest
import torch

pytest.importorskip("transformers")
from checkpoints import make_checkpoint  # noqa: E402

import infinitehip  # noqa: E402
from infinitehip import HiPConfig  # noqa: E402
from infinitehip.engine import PrefixCache, SamplingParams, stream  # noqa: E402

DOC = " ".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(60))


def answer(model, prompt, cache=None, backend="hip"):
    events = stream(model, [prompt], SamplingParams(max_new_tokens=6), backend=backend, chunk_size=64,
                    prefix_cache=cache)
    return "".join(e.text for e in events)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = HiPConfig.preset("tiny", model_context_length=1 << 20)
    return infinitehip.load(make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama"), config=cfg)


@pytest.mark.parametrize("backend", ["hip", "dense"])
def test_second_question_skips_the_document_prefill(model, backend):
    cache = PrefixCache(block_tokens=64, min_tokens=64)
    questions = [DOC + " question one?", DOC + " and question two?"]
    want = [answer(model, q, backend=backend) for q in questions]
    got = [answer(model, q, cache, backend=backend) for q in questions]
    assert got == want
    n_doc = len(model.tokenizer.encode(DOC))
    assert cache.stats.hits == 1
    assert cache.stats.reused_tokens >= n_doc - 64, "the whole document (in whole blocks) was reused"
    assert cache.stats.prefilled_tokens < n_doc + 64 + len(model.tokenizer.encode(questions[1]))


def test_save_and_load_round_trip(model, tmp_path):
    from infinitehip.engine.prefix_cache import fingerprint

    cache = PrefixCache(block_tokens=64, min_tokens=64)
    first = answer(model, DOC + " question one?", cache)
    owner = fingerprint(model, "hip")
    cache.save(tmp_path / "doc.safetensors", owner=owner)
    fresh = PrefixCache(block_tokens=64, min_tokens=64)
    fresh.load(tmp_path / "doc.safetensors", owner=owner)
    assert len(fresh) == 1
    assert answer(model, DOC + " question one?", fresh) == first
    assert fresh.stats.hits == 1
    # Only the model, backend and HiP config that wrote it may read it: the dense backend caches
    # rotated keys, other weights give other KV, and so do streaming attention and another HiP
    # config past the first sparse layer (each answered wrongly without an error before: a
    # streaming cache read by hip moved the first logits by 1.17).
    other_config = infinitehip.load(model.path, config=model.hip.replace(budget=2 * model.hip.budget))
    for other in (fingerprint(model, "dense"), fingerprint(model, "streaming"), fingerprint(other_config, "hip"),
                  "0" * 32):
        with pytest.raises(ValueError, match="written by another model, weights or backend"):
            PrefixCache().load(tmp_path / "doc.safetensors", owner=other)


def test_short_prompts_are_not_cached_and_bad_file_errors(model, tmp_path):
    cache = PrefixCache(block_tokens=64, min_tokens=1024)
    answer(model, "hello world", cache)
    assert len(cache) == 0
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable prefix-cache file"):
        cache.load(bad)


def test_one_cache_shared_by_two_backends_reuses_only_its_own_kv(model, tmp_path):
    """One PrefixCache passed to the dense backend and then to hip handed hip dense's rotated keys
    (found by trying it: hip's answer changed, with a cache 'hit' and no error)."""
    from infinitehip.engine.prefix_cache import fingerprint

    cache = PrefixCache(block_tokens=64, min_tokens=64)
    question = DOC + " and question two?"
    want = answer(model, question, backend="hip")
    answer(model, DOC + " question one?", cache, backend="dense")
    assert answer(model, question, cache, backend="hip") == want
    assert cache.stats.hits == 0 and len(cache) == 2   # the dense entry, then hip's own
    assert answer(model, question, cache, backend="dense") == answer(model, question, backend="dense")
    assert cache.stats.hits == 1
    # A file holds only the entries of the owner it is labelled with.
    cache.save(tmp_path / "hip.safetensors", owner=fingerprint(model, "hip"))
    fresh = PrefixCache(block_tokens=64, min_tokens=64)
    fresh.load(tmp_path / "hip.safetensors", owner=fingerprint(model, "hip"))
    assert len(fresh) == 1


def test_prompts_past_the_dense_cutoff_reuse_only_prefixes_prefilled_sparsely(model, tmp_path):
    """hip prefills a prompt past the dense cutoff sparsely in every chunk and a shorter one densely,
    so the same tokens' KV differs: a long question reusing a short document's dense KV would
    answer otherwise than alone."""
    from infinitehip.engine.prefix_cache import fingerprint

    cut = infinitehip.load(model.path, config=model.hip.replace(dense_threshold=400))
    short = " ".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(10))
    long = short + " " + " ".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(10, 14))
    assert len(cut.tokenizer.encode(short)) < 400 < len(cut.tokenizer.encode(long)) <= 500
    cache = PrefixCache(block_tokens=64, min_tokens=64)
    answer(cut, short, cache)
    assert answer(cut, long, cache) == answer(cut, long)
    assert cache.stats.hits == 0 and len(cache) == 2       # the short one's dense entry, the long one's
    assert answer(cut, long + " again?", cache) == answer(cut, long + " again?")
    assert cache.stats.hits == 1                             # the long one's sparse entry
    # The mark survives a file; files without it (dense below the cutoff) load as dense entries.
    owner = fingerprint(cut, "hip")
    cache.save(tmp_path / "two.safetensors", owner=owner)
    fresh = PrefixCache(block_tokens=64, min_tokens=64)
    fresh.load(tmp_path / "two.safetensors", owner=owner)
    assert sorted(e.sparse for e in fresh._entries.values()) == [False, True]


def test_load_keeps_at_most_max_entries(model, tmp_path):
    """load added every entry of the file, past max_entries (each one a document's KV in memory);
    found by loading a three-document file into a cache of two."""
    from infinitehip.engine.prefix_cache import fingerprint

    owner = fingerprint(model, "hip")
    cache = PrefixCache(block_tokens=64, min_tokens=64, max_entries=8)
    for i in range(3):
        answer(model, f"document {i}: " + DOC, cache)
    assert len(cache) == 3
    cache.save(tmp_path / "docs.safetensors", owner=owner)
    small = PrefixCache(block_tokens=64, min_tokens=64, max_entries=2)
    small.load(tmp_path / "docs.safetensors", owner=owner)
    assert len(small) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_entries_of_a_gpu_cache_live_in_host_memory():
    """Entries are outside the memory plan: cloned on the GPU, a server holding four long documents
    took GPU memory its next request's cache was planned to use (16 GiB per 128K tokens at 8B)."""
    from infinitehip.cache import KVCache

    kv = KVCache(2, 1, 256, 2, 64, dtype=torch.bfloat16, device="cuda")
    kv.k[0].normal_()
    pc = PrefixCache(block_tokens=64, min_tokens=64)
    pc.store(list(range(200)), kv)
    (entry,) = pc._entries.values()
    assert {t.device.type for t in entry.k + entry.v} == {"cpu"}
    again = KVCache(2, 1, 256, 2, 64, dtype=torch.bfloat16, device="cuda")
    assert pc.reuse(list(range(250)), again) == 192
    assert torch.equal(again.views(0)[0][0, :192], kv.views(0)[0][0, :192])


def test_an_entry_larger_than_the_host_can_hold_is_not_kept(monkeypatch, caplog):
    """An offloaded server's million-token prompt would be copied whole to host memory (131 GB at
    8B in bf16, beside its own host store): skipped with a warning, the prompt still answered."""
    import infinitehip.engine.prefix_cache as prefix_cache
    from infinitehip.cache import KVCache

    kv = KVCache(2, 1, 512, 2, 64, dtype=torch.float32, device="cpu")
    pc = PrefixCache(block_tokens=64, min_tokens=64)
    need = 2 * 448 * 2 * 2 * 64 * 4                      # K and V, 448 tokens, 2 layers x 2 heads x 64, float32
    monkeypatch.setattr(prefix_cache, "free_memory", lambda device: 2 * need - 1)
    with caplog.at_level("WARNING", logger="infinitehip.engine"):
        pc.store(list(range(450)), kv)
    assert len(pc) == 0 and "is not kept" in caplog.text
    monkeypatch.setattr(prefix_cache, "free_memory", lambda device: 2 * need)
    pc.store(list(range(450)), kv)
    assert len(pc) == 1
