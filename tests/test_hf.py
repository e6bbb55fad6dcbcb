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
