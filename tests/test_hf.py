"""The transformers drop-in: attn_implementation="infinitehip" matches eager attention where exact."""
import pytest
import torch
from checkpoints import hf_model, make_checkpoint

from infinitehip import HiPConfig

pytest.importorskip("transformers")
import infinitehip.hf  # noqa: E402  (registers the attention implementation)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hf"), "llama")


def test_drop_in_matches_eager_on_short_context(ckpt):
    tokens = torch.randint(0, 300, (2, 120), generator=torch.Generator().manual_seed(0))
    eager, ours = hf_model(ckpt), hf_model(ckpt, "infinitehip")
    with torch.no_grad():   # 120 keys <= sink + window of the paper preset: exact
        torch.testing.assert_close(ours(tokens).logits, eager(tokens).logits, atol=1e-4, rtol=0)
        ref = eager.generate(tokens[:1], max_new_tokens=6, do_sample=False)
        assert torch.equal(ours.generate(tokens[:1], max_new_tokens=6, do_sample=False), ref)


def test_drop_in_with_a_static_cache_matches_eager(ckpt):
    """A preallocated (static) cache hands attention all its slots and no mask: the keys past the
    last query's position are empty, and attend nothing (the drop-in read them before)."""
    tokens = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ref = hf_model(ckpt).generate(tokens, **kw)
        assert torch.equal(hf_model(ckpt, "infinitehip").generate(tokens, **kw), ref)


def test_drop_in_sparse_with_full_budget_is_exact(ckpt):
    full = HiPConfig.preset("tiny", stage_budgets=(None, 1024, 512), budget=512, dense_layer_budget=512)
    ours = hf_model(ckpt, "infinitehip")
    infinitehip.hf.set_config(ours, full)
    tokens = torch.randint(0, 300, (1, 250), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():   # 250 keys > 160 = sink + window of "tiny": pruning runs, keeps everything
        torch.testing.assert_close(ours(tokens).logits, hf_model(ckpt)(tokens).logits, atol=1e-4, rtol=0)
        infinitehip.hf.set_config(ours, "tiny")   # the real budget: runs, and differs
        assert not torch.allclose(ours(tokens).logits, hf_model(ckpt)(tokens).logits, atol=1e-3)
    with pytest.raises(TypeError, match="HiPConfig or a preset name"):
        infinitehip.hf.set_config(ours, 3)


def test_drop_in_refuses_padded_batches(ckpt):
    """A left-padded row attended its padding (logits off by 6.9 on its valid positions); now an
    error says what to do. An unpadded batch still runs."""
    a = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(3))
    b = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([a, torch.cat([torch.full((1, 18), 2), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :18] = 0
    ours = hf_model(ckpt, "infinitehip")
    with torch.no_grad(), pytest.raises(ValueError, match="does not take padded batches.*infinitehip.generate"):
        ours(ids, attention_mask=mask)
    with torch.no_grad():
        ours(ids, attention_mask=torch.ones_like(ids))


def test_drop_in_refuses_attention_it_cannot_reproduce():
    """Gemma 2's logit soft-capping ran, ignored (8e-3 off eager); now refused by name."""
    import transformers

    cfg = transformers.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=None)
    cfg._attn_implementation = "infinitehip"
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="cannot apply softcap"):
        model(torch.randint(5, 200, (1, 24)))


def test_drop_in_refuses_padded_batches_with_a_sliding_window(tmp_path):
    """Mistral-7B-v0.1's config (sliding_window=4096): the padding check was skipped for every
    sliding-window layer, so a left-padded row attended its padding (8.2 off eager, silently).
    Keys within the last query's window are checked."""
    ours = hf_model(make_checkpoint(tmp_path, "mistral", sliding_window=4096), "infinitehip")
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="does not take padded batches"):
        ours(ids, attention_mask=mask)
    with torch.no_grad():   # unpadded, and decode steps past a short window (keys outside it are hidden): run
        ours(ids, attention_mask=torch.ones_like(ids))
        short = hf_model(make_checkpoint(tmp_path / "w", "mistral", sliding_window=8), "infinitehip")
        short.generate(ids[:1], max_new_tokens=4, do_sample=False)


def test_drop_in_refuses_attention_dropout_while_training(tmp_path):
    """The dropout check read kwargs["dropout"], which the named parameter ``dropout`` always
    takes: a model with attention_dropout=0.5 trained with no dropout at all, silently."""
    ours = hf_model(make_checkpoint(tmp_path, "llama", attention_dropout=0.5), "infinitehip").train()
    tokens = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="no attention dropout"):
        ours(tokens, labels=tokens)
    ours.eval()   # eval passes dropout=0.0: runs
    with torch.no_grad():
        ours(tokens)


def test_drop_in_refuses_packed_sequences(ckpt):
    """Two sequences packed in one row (position_ids restart at 0, as eager and sdpa honour with a
    block-diagonal mask) failed deep inside hip_attention ("cache_seqlens=[30] must each be in
    [Tq, Tk]"); now an error names what was wrong. Consecutive positions from an offset still run."""
    tokens = torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(8))
    ours = hf_model(ckpt, "infinitehip")
    with torch.no_grad(), pytest.raises(ValueError, match="does not take packed sequences"):
        ours(tokens, position_ids=torch.cat([torch.arange(30), torch.arange(30)])[None])
    with torch.no_grad():
        offset = torch.arange(100, 160)[None]
        torch.testing.assert_close(ours(tokens, position_ids=offset).logits,
                                   hf_model(ckpt)(tokens, position_ids=offset).logits, atol=1e-4, rtol=0)


def test_drop_in_refuses_output_attentions(ckpt):
    """output_attentions=True returned an empty tuple of attentions (eager returns one (B, H, Tq, Tk)
    per layer), with no word; now an error says to load with eager."""
    tokens = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions=True.*eager"):
        hf_model(ckpt, "infinitehip")(tokens, output_attentions=True)


def test_drop_in_sliding_window_layers_match_eager(tmp_path):
    """Sliding-window layers ignored their window at prefill, but transformers' sliding cache keeps
    only the window, so decode steps saw just that: generate matched neither eager nor the
    documented "attends like every other layer" (a continuation through the cache was 9.1 off the
    same tokens in one forward). They now attend as sdpa does; the full-attention layers of a mixed
    model stay InfiniteHiP."""
    tokens = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(10))
    for arch, kw in (("mistral", {}), ("qwen2", dict(use_sliding_window=True, max_window_layers=1))):
        path = make_checkpoint(tmp_path / arch, arch, sliding_window=8, **kw)
        eager, ours = hf_model(path), hf_model(path, "infinitehip")
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens).logits, eager(tokens).logits, atol=1e-4, rtol=0)
            for cache in (None, "static"):
                gen = dict(max_new_tokens=8, do_sample=False, cache_implementation=cache)
                assert torch.equal(ours.generate(tokens, **gen), eager.generate(tokens, **gen))


@pytest.mark.parametrize("arch, device", [("llama", "cpu"), ("llama3-rope", "cpu"), ("qwen3", "cpu"), pytest.param(
    "llama", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_hip_cache_matches_the_lean_engine_past_the_trained_length(tmp_path, arch, device):
    """With HiPCache the drop-in is InfiniteHiP as infinitehip.load runs it: keys un-rotated and
    rotated at adaptive positions (400 tokens; trained on 256, or 128 before llama3 rope scaling),
    masks reused by the refresh schedule over decode steps (on CUDA: the Triton kernels). Without
    it (keys rotated by transformers) the logits differ."""
    from infinitehip.cache import KVCache
    from infinitehip.engine import DecodeState, decode_one_token, prefill

    path = make_checkpoint(tmp_path, arch)
    lean = infinitehip.load(path, config="tiny", device=device, dtype="float32")
    ours, plain = hf_model(path, "infinitehip").to(device), hf_model(path, "infinitehip").to(device)
    for m in (ours, plain):
        infinitehip.hf.set_config(m, "tiny")
    tokens = torch.randint(3, 300, (1, 400), generator=torch.Generator().manual_seed(3)).to(device)
    a = lean.args
    kv = KVCache(a.n_layers, 1, 512, a.n_kv_heads, a.head_dim, dtype=lean.dtype, device=device)
    state, cache = DecodeState("hip"), infinitehip.hf.HiPCache(ours)
    tol = dict(atol=1e-4 if device == "cpu" else 5e-3, rtol=0)    # CUDA: TF32 dots in both
    with torch.no_grad():
        want = prefill(lean, tokens, kv, backend="hip", chunk_size=512)
        torch.testing.assert_close(ours(tokens, past_key_values=cache).logits[:, -1], want, **tol)
        assert not torch.allclose(plain(tokens).logits[:, -1], want, atol=1e-2)
        state.admit(0, 1)
        for step in range(10):   # tiny's intervals (16, 8, 4): steps 1-3 reuse, 4 and 8 rerun the last stage
            token = want.argmax(-1)
            want = decode_one_token(lean, token, torch.tensor([400 + step], device=device), kv, state)
            got = ours(token[:, None], past_key_values=cache).logits[:, -1]
            torch.testing.assert_close(got, want, **tol)
        assert [m.step for m in cache._masks.values()] == [9, 9]


def test_hip_cache_second_turn_matches_the_lean_engine(ckpt):
    """A chat's second turn through the same HiPCache (a prefill of several tokens after decode
    steps, past the trained length) is the lean engine's continued prefill (``start=``), and its
    decode steps prune from scratch first, as a newly admitted row does."""
    from infinitehip.cache import KVCache
    from infinitehip.engine import DecodeState, decode_one_token, prefill

    lean = infinitehip.load(ckpt, config="tiny", device="cpu", dtype="float32")
    ours = hf_model(ckpt, "infinitehip")
    infinitehip.hf.set_config(ours, "tiny")
    a = lean.args
    kv = KVCache(a.n_layers, 1, 512, a.n_kv_heads, a.head_dim, dtype=lean.dtype, device="cpu")
    state, cache = DecodeState("hip"), infinitehip.hf.HiPCache(ours)
    tokens = torch.randint(3, 300, (1, 330), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        prefill(lean, tokens[:, :300], kv, chunk_size=512)
        ours(tokens[:, :300], past_key_values=cache)
        state.admit(0, 1)
        for t in range(300, 305):   # the first turn's answer
            want = decode_one_token(lean, tokens[:, t], torch.tensor([t]), kv, state)
            torch.testing.assert_close(ours(tokens[:, t:t + 1], past_key_values=cache).logits[:, -1], want,
                                       atol=1e-4, rtol=0)
        want = prefill(lean, tokens[:, :325], kv, chunk_size=512, start=305)   # the user's next turn
        torch.testing.assert_close(ours(tokens[:, 305:325], past_key_values=cache).logits[:, -1], want,
                                   atol=1e-4, rtol=0)
        state.admit(0, 1)
        for t in range(325, 330):
            want = decode_one_token(lean, tokens[:, t], torch.tensor([t]), kv, state)
            torch.testing.assert_close(ours(tokens[:, t:t + 1], past_key_values=cache).logits[:, -1], want,
                                       atol=1e-4, rtol=0)


def test_hip_cache_prunes_from_scratch_after_a_prefill_a_crop_or_skipped_keys(ckpt):
    """A mask describes its rows' keys: a crop, a new prompt (Tq > 1) or a call that skips keys
    drops it, so the next decode step prunes from scratch. A crop(0) drops nothing (transformers
    calls it every step where it defers the stop check, which had kept every mask from reuse)."""
    ours = hf_model(ckpt, "infinitehip")
    infinitehip.hf.set_config(ours, "tiny")
    cache = infinitehip.hf.HiPCache(ours)
    tokens = torch.randint(3, 300, (2, 300), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours(tokens, past_key_values=cache)
        assert all(m.mask is None for m in cache._masks.values())       # a prefill's mask is not reused
        for _ in range(3):
            ours(tokens[:, :1], past_key_values=cache)
            cache.crop(0)
        assert [m.step for m in cache._masks.values()] == [2, 2]
        cache.crop(-1)
        assert not cache._masks
        ours(tokens[:, :1], past_key_values=cache)
        assert [m.step for m in cache._masks.values()] == [0, 0]
        assert cache.reuse(0, HiPConfig.preset("tiny"), (2, 1), 303)[1:] == (0, 0)   # keys skipped
        assert cache._masks
        cache.reset()
        assert not cache._masks and cache.get_seq_length() == 0


def test_hip_cache_moves_masks_with_reordered_rows(ckpt):
    """Beam search reorders the cache every step, and that dropped every mask: each step pruned
    from scratch, never reusing one. Now each row's mask moves with its keys: the step after a
    reordering is the step its rows would have taken where they were, and generate(num_beams=2)
    keeps the refresh schedule."""
    import copy

    ours = hf_model(ckpt, "infinitehip")
    infinitehip.hf.set_config(ours, "tiny")
    cache = infinitehip.hf.HiPCache(ours)
    tokens = torch.randint(3, 300, (2, 300), generator=torch.Generator().manual_seed(4))
    swap = torch.tensor([1, 0])
    with torch.no_grad():
        ours(tokens, past_key_values=cache)
        for t in range(3):
            ours(tokens[:, t:t + 1], past_key_values=cache)
        kept = copy.deepcopy(cache)
        cache.reorder_cache(swap)
        assert [m.step for m in cache._masks.values()] == [2, 2]
        moved = ours(tokens[swap, 3:4], past_key_values=cache).logits
        torch.testing.assert_close(moved, ours(tokens[:, 3:4], past_key_values=kept).logits[swap], atol=1e-5, rtol=0)
        beams = infinitehip.hf.HiPCache(ours)
        ours.generate(tokens[:1], past_key_values=beams, num_beams=2, max_new_tokens=6, do_sample=False)
        assert [m.step for m in beams._masks.values()] == [4, 4]   # 5 decode steps, the last kept step 4


def test_hip_cache_writes_decode_steps_in_place(ckpt):
    """transformers' DynamicLayer concatenates: every decode step copied the layer's whole cache
    (and attention copied the keys again), O(context) bytes a step where sparse attention reads a
    few thousand keys. HiPCache's layers keep (B, capacity, K, D) buffers grown by half when
    full: a step writes its row, attention reads a view of the buffer, and the keys and values
    are those a DynamicCache holds after the same calls (all of layer 0's; the prompt's in every
    layer: the decode steps' attention differs, the DynamicCache's pruning from scratch)."""
    from transformers import DynamicCache

    ours = hf_model(ckpt, "infinitehip")
    infinitehip.hf.set_config(ours, "tiny")
    cache = infinitehip.hf.HiPCache(ours)
    plain = DynamicCache()   # made after the HiPCache: un-rotated keys too
    tokens = torch.randint(3, 300, (1, 520), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        for c in (cache, plain):
            ours(tokens[:, :500], past_key_values=c)
        layer = cache.layers[0]
        buffer = layer._k.data_ptr()
        assert layer._k.shape[1] == 512 and layer.keys.data_ptr() == buffer
        for t in range(500, 520):
            for c in (cache, plain):
                ours(tokens[:, t:t + 1], past_key_values=c)
            if t < 511:   # 512 keys fit: written in place
                assert layer._k.data_ptr() == buffer and layer.keys.data_ptr() == buffer
        assert layer._k.shape[1] == 768 and layer.keys.data_ptr() == layer._k.data_ptr()   # grown by half
    assert cache.get_seq_length() == plain.get_seq_length() == 520
    for i, (mine, theirs) in enumerate(zip(cache.layers, plain.layers)):
        n = 520 if i == 0 else 500
        assert torch.equal(mine.keys[:, :, :n], theirs.keys[:, :, :n])
        assert torch.equal(mine.values[:, :, :n], theirs.values[:, :, :n])



def test_hip_cache_buffers_stay_sized_to_their_keys_under_beam_search(ckpt):
    """Beam search replaces each layer's keys by a reordered copy every step, and each such copy was
    taken into buffers half again as large as the last: 20 steps of num_beams=2 held 920K rows for
    79 keys (at the 8B shape, hundreds of GB). A copy is taken into buffers sized to it; only full
    buffers that are still written in place grow by half. Batch selections and a crop to nothing
    likewise."""
    eager, ours = hf_model(ckpt), hf_model(ckpt, "infinitehip")
    tokens = torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(14))
    gen = dict(max_new_tokens=20, min_new_tokens=20, num_beams=2, num_return_sequences=2, do_sample=False)
    cache = infinitehip.hf.HiPCache(ours)
    with torch.no_grad():   # within sink + window: exact
        assert torch.equal(ours.generate(tokens, past_key_values=cache, **gen), eager.generate(tokens, **gen))
        assert [layer._k.shape[:2] for layer in cache.layers] == [(2, 256)] * 2
        cache.batch_select_indices(torch.tensor([1]))
        ours(tokens[:, :1], past_key_values=cache)
        cache.crop(-cache.get_seq_length())
        ours(tokens[:, :1], past_key_values=cache)
    assert [layer._k.shape[:2] for layer in cache.layers] == [(1, 256)] * 2


def test_hip_cache_reset_drops_the_keys_under_transformers_5_17(ckpt, monkeypatch):
    """transformers 5.17's DynamicLayer had no reset of its own: the base class zeroed the keys in
    place and kept their length, so after HiPCache.reset ("a new sequence") the next prompt followed
    that many zero keys and attended them, silently. HiPCache's layers drop them on any version."""
    from transformers.cache_utils import DynamicLayer

    if "reset" in vars(DynamicLayer):   # 5.24's own reset gone: as in 5.17
        monkeypatch.delattr(DynamicLayer, "reset")
    ours = hf_model(ckpt, "infinitehip")
    tokens = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(15))
    cache = infinitehip.hf.HiPCache(ours)
    with torch.no_grad():
        ours(tokens[:, 20:], past_key_values=cache)
        cache.reset()
        assert cache.get_seq_length() == 0
        got = ours(tokens, past_key_values=cache).logits
        torch.testing.assert_close(got, ours(tokens, past_key_values=infinitehip.hf.HiPCache(ours)).logits,
                                   atol=0, rtol=0)


def _eager_and_drop_in(model_class, cfg):
    """Two models of ``model_class`` with the same random weights: eager attention and the drop-in."""
    torch.manual_seed(0)
    eager = model_class(cfg).eval()
    ours = model_class(cfg).eval()
    ours.load_state_dict(eager.state_dict())
    ours.set_attn_implementation("infinitehip")
    return eager, ours


def test_hip_cache_keeps_a_hybrid_models_other_layers():
    """LFM2 (conv and attention layers, full RoPE): HiPCache replaced every layer of transformers'
    cache with its growing attention layer, and the conv layers' state went with it (ValueError:
    "Cannot get conv state"). Only the plain attention layers are replaced; generate == eager."""
    import transformers

    cfg = transformers.Lfm2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  layer_types=["conv", "full_attention"])
    eager, ours = _eager_and_drop_in(transformers.Lfm2ForCausalLM, cfg)
    tokens = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        got = ours.generate(tokens, past_key_values=infinitehip.hf.HiPCache(ours), max_new_tokens=5, do_sample=False)
        assert torch.equal(got, eager.generate(tokens, max_new_tokens=5, do_sample=False))

def test_hip_cache_keeps_short_contexts_exact_and_other_implementations_working(ckpt):
    """Within sink + window the rotation moved into attention changes nothing (generate == eager);
    switching the model to eager afterwards rotates as transformers does again."""
    tokens = torch.randint(0, 300, (1, 120), generator=torch.Generator().manual_seed(0))
    eager, ours = hf_model(ckpt), hf_model(ckpt, "infinitehip")
    with torch.no_grad():
        ref = eager.generate(tokens, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours.generate(tokens, max_new_tokens=6, do_sample=False,
                                         past_key_values=infinitehip.hf.HiPCache(ours)), ref)
        assert torch.equal(ours.generate(tokens, max_new_tokens=6, do_sample=False), ref)   # DynamicCache
        ours.set_attn_implementation("eager")
        torch.testing.assert_close(ours(tokens).logits, eager(tokens).logits, atol=1e-5, rtol=0)


def test_hip_cache_refuses_what_it_cannot_reproduce(ckpt, tmp_path):
    with pytest.raises(ValueError, match="attn_implementation='infinitehip'.*'eager'"):
        infinitehip.hf.HiPCache(hf_model(ckpt))
    mistral = hf_model(make_checkpoint(tmp_path, "mistral", sliding_window=8), "infinitehip")
    with pytest.raises(ValueError, match="sliding-window layers"):
        infinitehip.hf.HiPCache(mistral)
    odd = hf_model(ckpt, "infinitehip")
    odd.model.rotary_emb.inv_freq.mul_(1.5)      # a rotation that is not the config's
    with pytest.raises(ValueError, match="differs from the RoPE infinitehip computes"):
        infinitehip.hf.HiPCache(odd)
    with torch.no_grad():   # refused before anything changed: the model still runs as it did
        odd(torch.randint(3, 300, (1, 20)))
    # .to(bfloat16) casts RoPE's frequencies too (from_pretrained(dtype=...) keeps them float32): the
    # model's rotation is no longer its config's, and the error says how to load it instead.
    with pytest.raises(ValueError, match=r"inv_freq\) are torch.bfloat16.*from_pretrained\(\.\.\., dtype=\.\.\.\)"):
        infinitehip.hf.HiPCache(hf_model(ckpt, "infinitehip").to(torch.bfloat16))


def test_hip_cache_takes_the_models_own_frequencies_within_rounding(ckpt):
    """Computed on a GPU (float32 pow) a model's RoPE frequencies can be an ulp off those computed
    here from its config (float64): at position 4K the angles differ by 5e-4, and HiPCache refused
    every such model (an H200, transformers 5.17). Within rounding it takes the model's own, so
    attention rotates exactly as the model would have."""
    eager, ours = hf_model(ckpt), hf_model(ckpt, "infinitehip")
    for m in (eager, ours):
        f = m.model.rotary_emb.inv_freq
        f.copy_(torch.nextafter(f, torch.full_like(f, 2.0)))
    tokens = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        got = ours(tokens, past_key_values=infinitehip.hf.HiPCache(ours)).logits
        torch.testing.assert_close(got, eager(tokens).logits, atol=1e-4, rtol=0)


def test_set_config_takes_effect_after_a_hip_cache_was_made(ckpt):
    """Making a HiPCache froze each layer's config from the global default of that moment: a later
    set_config(None, ...) was silently ignored by that model (tiny asked, paper's budget ran).
    Configs are resolved per call now; the trained length fills model_context_length whichever
    came first, unless the config names its own."""
    tokens = torch.randint(3, 300, (1, 300), generator=torch.Generator().manual_seed(5))
    first, later = hf_model(ckpt, "infinitehip"), hf_model(ckpt, "infinitehip")
    infinitehip.hf.set_config(first, "tiny")
    first_cache = infinitehip.hf.HiPCache(first)
    later_cache = infinitehip.hf.HiPCache(later)
    attention = later.model.layers[0].self_attn
    try:
        infinitehip.hf.set_config(None, "tiny")
        resolved = infinitehip.hf._module_config
        assert resolved(attention) == resolved(first.model.layers[0].self_attn)
        with torch.no_grad():
            torch.testing.assert_close(later(tokens, past_key_values=later_cache).logits,
                                       first(tokens, past_key_values=first_cache).logits, atol=1e-5, rtol=0)
    finally:
        infinitehip.hf.set_config(None, "paper")
    for model in (first, later):
        assert infinitehip.hf._module_config(model.model.layers[0].self_attn).model_context_length == 256
    infinitehip.hf.set_config(later, HiPConfig.preset("tiny", model_context_length=100))
    assert infinitehip.hf._module_config(attention).model_context_length == 100


def test_hip_cache_leaves_layers_without_rope_unrotated():
    """SmolLM3 (and Llama 4) skip RoPE in some layers (no_rope_layers): HiPCache rotated them
    inside attention all the same, 3.6 off eager within sink + window, silently."""
    import transformers

    cfg = transformers.SmolLM3Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                     initializer_range=0.2, no_rope_layers=[1, 0])   # layer 1: no RoPE
    eager, ours = _eager_and_drop_in(transformers.SmolLM3ForCausalLM, cfg)
    tokens = torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = ours(tokens, past_key_values=infinitehip.hf.HiPCache(ours)).logits
        torch.testing.assert_close(got, eager(tokens).logits, atol=1e-4, rtol=0)


def test_hip_cache_refuses_a_cache_made_for_another_model(ckpt):
    """A HiPCache made for one model and passed to another ran that model's keys rotated by
    transformers and no rotation in attention: the drop-in without adaptive RoPE, silently."""
    one, other = hf_model(ckpt, "infinitehip"), hf_model(ckpt, "infinitehip")
    cache = infinitehip.hf.HiPCache(one)
    with torch.no_grad(), pytest.raises(ValueError, match="made for another model.*HiPCache\\(model\\)"):
        other(torch.randint(3, 300, (1, 20)), past_key_values=cache)


@pytest.mark.parametrize("kind", ["dynamic", "longrope", "gpt-neox"])
def test_hip_cache_refuses_rope_it_cannot_take_over_before_changing_the_model(kind):
    """Dynamic NTK and LongRoPE were refused with RoPE.from_hf's "rope type ... is not supported",
    which named no way on; GPT-NeoX (partial rotary) failed with an AttributeError (no head_dim).
    Each now says HiPCache cannot take over the rotation and to use the drop-in without it, and
    the model still runs as before."""
    import transformers

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256)
    if kind == "gpt-neox":
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**base))
    else:
        rope = {"rope_type": kind, "factor": 2.0, "rope_theta": 10000.0} if kind == "dynamic" else {
            "rope_type": kind, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 2.0,
            "original_max_position_embeddings": 128, "rope_theta": 10000.0}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base, rope_parameters=rope))
    model.eval().set_attn_implementation("infinitehip")
    tokens = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(tokens).logits
        with pytest.raises(ValueError, match="HiPCache cannot take over.*drop-in without"):
            infinitehip.hf.HiPCache(model)
        torch.testing.assert_close(model(tokens).logits, before, atol=0, rtol=0)
