"""Loader: every supported architecture gives transformers' logits; every load error says what to do."""
import json

import pytest
import torch
from checkpoints import ARCHS, hf_model, make_checkpoint

import infinitehip
from infinitehip import HiPConfig
from infinitehip.cache import KVCache
from infinitehip.models import AttentionCall

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_checkpoint(root, arch) for arch in ARCHS}


def forward(model, ids, backend, capacity=512):
    a = model.args
    cache = KVCache(a.n_layers, ids.shape[0], capacity, a.n_kv_heads, a.head_dim, dtype=model.dtype, device="cpu")
    return model.net(ids, torch.zeros(ids.shape[0], dtype=torch.long), cache, AttentionCall(backend))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(ckpts, arch):
    model = infinitehip.load(ckpts[arch], config="tiny")
    ids = torch.randint(0, 300, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ckpts[arch])(ids).logits
    tol = 1e-4 * ref.abs().max().item()
    # dense, and hip while the context fits in sink + window (160 for "tiny"): both exact
    for backend in ("dense", "hip", "streaming"):
        torch.testing.assert_close(forward(model, ids, backend), ref, atol=tol, rtol=0)


def test_context_length_and_rope_from_config(ckpts, tmp_path):
    assert infinitehip.load(ckpts["llama"]).hip.model_context_length == 256
    # rope-scaled: the trained context is original_max_position_embeddings
    assert infinitehip.load(ckpts["llama3-rope"]).hip.model_context_length == 128
    explicit = HiPConfig.preset("tiny", model_context_length=64)
    assert infinitehip.load(ckpts["llama"], config=explicit).hip.model_context_length == 64
    # transformers < 5 writes rope_theta + rope_scaling instead of rope_parameters: same model
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in ckpts["llama3-rope"].iterdir():
        (legacy / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((legacy / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (legacy / "config.json").write_text(json.dumps(cfg))
    a, b = infinitehip.load(ckpts["llama3-rope"]), infinitehip.load(legacy)
    assert b.hip.model_context_length == 128
    torch.testing.assert_close(a.net.rope.inv_freq, b.net.rope.inv_freq)


def test_sharded_checkpoint(tmp_path):
    path = make_checkpoint(tmp_path, "qwen2")
    hf = hf_model(path)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((path / f).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(forward(infinitehip.load(sharded), ids, "dense"), ref, atol=1e-4, rtol=0)


def test_tokenizer_and_chat_template(ckpts):
    tok = infinitehip.load(ckpts["llama"]).tokenizer
    ids = tok.encode("hello world")
    assert ids[0] == 0 and tok.decode(ids) == "hello world"       # BOS added, skipped on decode
    assert tok.eos_token_ids == (1,)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s><|user|>hi</s><|assistant|>"


# ---------------------------------------------------------------- errors

def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_error_path_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        infinitehip.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        infinitehip.load(tmp_path)


def test_error_unsupported_architecture(ckpts, tmp_path):
    path = _copy(ckpts["llama"], tmp_path / "gpt2")
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported; supported: LlamaForCausalLM, "
                                         "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        infinitehip.load(path)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_error_missing_file(ckpts, tmp_path, name):
    path = _copy(ckpts["llama"], tmp_path / "m")
    (path / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {name}"):
        infinitehip.load(path)


def test_error_missing_tensor(ckpts, tmp_path):
    path = _copy(ckpts["llama"], tmp_path / "m")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"1 tensors are missing.*layers.1.feed_forward.w13.weight\[part 1\]"):
        infinitehip.load(path)


def test_error_missing_lm_head_hints_tying(ckpts, tmp_path):
    path = _copy(ckpts["llama"], tmp_path / "m")
    _rewrite_weights(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        infinitehip.load(path)


def test_error_shape_mismatch(ckpts, tmp_path):
    path = _copy(ckpts["llama"], tmp_path / "m")
    _edit_config(path, intermediate_size=128)
    with pytest.raises(ValueError, match=r"_proj.weight has shape \(\d+, \d+\) but config.json implies"):
        infinitehip.load(path)


def test_error_unexpected_tensor(ckpts, tmp_path):
    path = _copy(ckpts["llama"], tmp_path / "m")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(ValueError, match="do not belong to a LlamaForCausalLM.*q_norm"):
        infinitehip.load(path)


def test_error_corrupt_file(ckpts, tmp_path):
    path = _copy(ckpts["llama"], tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        infinitehip.load(path)


def test_error_missing_shard(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    hf_model(path).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists {shard.name} but it is missing"):
        infinitehip.load(tmp_path / "sharded")


def test_error_incomplete_config_and_index(ckpts, tmp_path):
    """config.json without a required field, and an index without its weight_map: one-line
    errors naming what is missing (they were KeyErrors from deep inside)."""
    import json

    path = _copy(ckpts["llama"], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["intermediate_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json lacks intermediate_size"):
        infinitehip.load(path)
    path = _copy(ckpts["llama"], tmp_path / "n")
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="not a safetensors index.*weight_map"):
        infinitehip.load(path)


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json"])
def test_error_malformed_side_file_names_it(ckpts, tmp_path, name):
    path = _copy(ckpts["llama"], tmp_path / "m")
    (path / name).write_text("{not json")
    with pytest.raises(ValueError, match=f"{name} is not valid JSON"):
        infinitehip.load(path)


def test_info_reports_a_corrupt_shard_in_one_line(tmp_path):
    from infinitehip.models.loader import inspect_checkpoint

    hf_model(make_checkpoint(tmp_path, "llama")).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot read .*{shard.name}.*truncated or corrupt"):
        inspect_checkpoint(tmp_path / "sharded", device="cpu")


def test_sliding_window_checkpoints_warn(ckpts, tmp_path):
    """Mistral v0.1 attends only its last sliding_window keys per layer: loading says that answers
    past it differ from transformers' (the decoder attends further)."""
    path = _copy(ckpts["mistral"], tmp_path / "m")
    _edit_config(path, sliding_window=32)
    with pytest.warns(UserWarning, match="sliding_window=32.*past 32 tokens answers differ"):
        infinitehip.load(path)


def test_error_config_shapes_the_code_read_blindly(ckpts, tmp_path):
    """A config.json holding a list, a linear rope scaling without its factor, a tokenizer larger
    than the model's vocabulary: each a one-line error (an AttributeError, a KeyError, an
    IndexError at the first forward pass before)."""
    path = _copy(ckpts["llama"], tmp_path / "a")
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json holds a JSON list, not an object"):
        infinitehip.load(path)
    path = _copy(ckpts["llama"], tmp_path / "b")
    _edit_config(path, rope_scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="rope type 'linear' needs factor"):
        infinitehip.load(path)
    path = _copy(ckpts["llama"], tmp_path / "c")
    _edit_config(path, vocab_size=200)
    _rewrite_weights(path, lambda ts: ts.update({n: t[:200] for n, t in ts.items() if t.shape[0] == 320}))
    with pytest.raises(ValueError, match="tokenizer.json has .* tokens but the model's vocabulary only 200"):
        infinitehip.load(path)


def test_error_dtype_and_device(ckpts):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        infinitehip.load(ckpts["llama"], dtype="int8")
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        infinitehip.load(ckpts["llama"], dtype=torch.float64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            infinitehip.load(ckpts["llama"], device="cuda")
    with pytest.raises(ValueError, match="device='gpu' is not a device; use 'cpu', 'cuda'"):   # torch's RuntimeError
        infinitehip.load(ckpts["llama"], device="gpu")
    with pytest.raises(ValueError, match="device='meta' is not supported"):
        infinitehip.load(ckpts["llama"], device="meta")


def test_error_bad_preset(ckpts):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        infinitehip.load(ckpts["llama"], config="huge")


@pytest.mark.parametrize("recommended, message", [
    ({"preset": "papr"}, "unknown preset 'papr'"),                     # read as if --preset papr were given
    ({"budjet": 64}, "unexpected keyword argument 'budjet'"),
    ("tiny", "it must be an object like"),                             # "dictionary update sequence element"
    ({"preset": ["tiny"]}, r"unknown preset \['tiny'\]"),               # was "unhashable type: 'list'"
])
def test_error_bad_recommended_config_names_config_json(ckpts, tmp_path, recommended, message):
    path = _copy(ckpts["llama"], tmp_path / "m")
    _edit_config(path, infinitehip=recommended)
    with pytest.raises(ValueError, match=f"config.json's \"infinitehip\" recommendation is invalid: .*{message}"):
        infinitehip.load(path)
    infinitehip.load(path, config="tiny")                              # a config given: not read


def test_error_no_chat_template(ckpts, tmp_path):
    path = _copy(ckpts["llama"], tmp_path / "m")
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    model = infinitehip.load(path)
    with pytest.raises(ValueError, match="has no chat template"):
        infinitehip.generate(model, "hi", chat=True, max_new_tokens=2)


def test_tied_config_with_its_own_lm_head_is_untied_as_transformers_does(ckpts, tmp_path):
    """config.json says tie_word_embeddings but the checkpoint holds an lm_head.weight of its own:
    one of the two overwrote the other in the shared tensor (logits 6.6 off transformers, silently).
    transformers unties them and warns; so does load. A copy of the embedding stays tied."""
    path = _copy(ckpts["llama"], tmp_path / "m")
    _edit_config(path, tie_word_embeddings=True)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf_model(path)(ids).logits
    with pytest.warns(UserWarning, match="lm_head.weight.*untied"):
        model = infinitehip.load(path, config="tiny")
    assert not model.args.tie_embeddings
    torch.testing.assert_close(forward(model, ids, "dense"), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    _rewrite_weights(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = infinitehip.load(path, config="tiny")
    assert model.args.tie_embeddings and model.net.output.weight is model.net.tok_embeddings.weight


def test_rope_scaling_added_to_a_transformers5_config_is_applied(ckpts, tmp_path):
    """Qwen2.5's model card has users add "rope_scaling": {"type": "yarn", ...} to config.json. In
    a config written by transformers 5 ("rope_parameters": {"rope_type": "default"}) the old key
    "type" lost to "rope_type": YaRN and its trained context were silently dropped (transformers
    applies them)."""
    path = _copy(ckpts["llama"], tmp_path / "m")
    _edit_config(path, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    model = infinitehip.load(path, config="tiny")
    assert model.hip.model_context_length == 64
    ref = hf_model(path).model.rotary_emb
    torch.testing.assert_close(model.net.rope.inv_freq.cpu(), ref.inv_freq.float(), rtol=1e-6, atol=0)
    assert model.net.rope.attention_scaling == pytest.approx(ref.attention_scaling)


def test_config_quantized_or_without_architectures(ckpts, tmp_path):
    """A quantized checkpoint (AWQ, GPTQ, FP8: config.json's quantization_config) failed on its
    scale tensors as "do not belong to a LlamaForCausalLM"; a config.json without "architectures"
    (transformers goes by model_type) as "architecture None is not supported"."""
    path = _copy(ckpts["llama"], tmp_path / "q")
    _edit_config(path, quantization_config={"quant_method": "fp8"})
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale": torch.ones(1)}))
    with pytest.raises(ValueError, match="quantized checkpoint \\(quant_method 'fp8'\\).*not supported.*unquantized"):
        infinitehip.load(path, config="tiny")
    path = _copy(ckpts["qwen2"], tmp_path / "a")
    _edit_config(path, architectures=None, max_position_embeddings=None)
    model = infinitehip.load(path, config="tiny")
    assert model.args.architecture == "Qwen2ForCausalLM" and model.hip.model_context_length is None
    _edit_config(path, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2'.*not supported"):
        infinitehip.load(path, config="tiny")


def test_hidden_act_swish_is_silu_and_others_are_refused(ckpts, tmp_path):
    """transformers maps hidden_act "swish" to SiLU: such a config was refused as unsupported."""
    path = _copy(ckpts["llama"], tmp_path / "s")
    _edit_config(path, hidden_act="swish")
    model = infinitehip.load(path, config="tiny")
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf_model(path)(ids).logits
    torch.testing.assert_close(forward(model, ids, "dense"), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    _edit_config(path, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        infinitehip.load(path, config="tiny")


def test_gpu_dtype_prefers_dtype_to_torch_dtype(monkeypatch):
    """A config.json with both keys (a transformers 4 config saved again by transformers 5, or
    edited): transformers keeps "dtype", load took "torch_dtype"."""
    from infinitehip.models.loader import resolve_device_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = {"dtype": "bfloat16", "torch_dtype": "float16"}
    assert resolve_device_dtype("cuda", None, cfg) == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device_dtype("cuda", None, {"torch_dtype": "float16"})[1] == torch.float16


@pytest.mark.parametrize("stored", [torch.float16, torch.float32, torch.bfloat16])
def test_gpu_dtype_without_one_in_the_config_is_the_weights(stored, monkeypatch, tmp_path):
    """A config.json without dtype or torch_dtype loaded bfloat16 on the GPU whatever the weights
    were (a float16 checkpoint lost precision); transformers 5 takes the weights' dtype."""
    from safetensors.torch import save_file

    from infinitehip.models.loader import resolve_device_dtype, weight_files

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2, dtype=stored)}, tmp_path / "model.safetensors")
    files = weight_files(tmp_path)
    assert resolve_device_dtype("cuda", None, {}, files)[1] == stored
    assert resolve_device_dtype("cuda", None, {"torch_dtype": "bfloat16"}, files)[1] == torch.bfloat16  # config wins
    assert resolve_device_dtype("cpu", None, {}, files)[1] == torch.float32
