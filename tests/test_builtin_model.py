"""The shipped model: HF format, small, and the engine computes what transformers computes."""
import json

import pytest
import torch

from infinitehip.assets import builtin_model_path, resolve_model_path

PATH = builtin_model_path()


def test_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (PATH / name).is_file(), name
    assert (PATH / "model.safetensors").stat().st_size <= 16 * 2 ** 20
    cfg = json.loads((PATH / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["max_position_embeddings"] == 512
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]          # GQA
    assert resolve_model_path("builtin") == str(PATH)


def test_load_by_name_uses_the_checkpoints_preset():
    import infinitehip

    model = infinitehip.load("builtin", device="cpu")
    assert model.path == PATH and model.hip.sink == infinitehip.HiPConfig.preset("tiny").sink
    assert model.hip.model_context_length == 512 and model.hip.dense_threshold == 512   # dense within C
    assert infinitehip.load("builtin", device="cpu", config="paper").hip.sink == 256


def test_logits_match_transformers():
    transformers = pytest.importorskip("transformers")
    import infinitehip

    ref = transformers.AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    ours = infinitehip.load(PATH, device="cpu", dtype="float32", config="tiny")
    text = "The pass key is 71432. Remember it. What is the pass key?\nAnswer:"
    ids = tok(text).input_ids
    assert ids == ours.tokenizer.encode(text) and ids[0] == tok.bos_token_id
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0, -1]
    from infinitehip.cache.kv import KVCache
    from infinitehip.engine import prefill

    a = ours.args
    cache = KVCache(a.n_layers, 1, len(ids), a.n_kv_heads, a.head_dim, dtype=torch.float32, device="cpu")
    got = prefill(ours, torch.tensor([ids]), cache, backend="dense")[0]
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3), (got - expected).abs().max()
    assert int(got.argmax()) == int(expected.argmax())
