"""RoPE variants against transformers' own implementation (the oracle)."""
import pytest
import torch

from infinitehip import RoPE

transformers = pytest.importorskip("transformers")

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    # null betas are the defaults (float(None) was a TypeError); mscale / mscale_all_dim set the
    # attention factor as their ratio (it was YaRN's default, 1.1386 here, where transformers gives 1.0)
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": None,
     "beta_slow": None},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 0.707,
     "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.5},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "-".join(str(k) for k in (s or {"default": 0})
                                                                     if k not in ("factor",)))
def test_inv_freq_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0,
                     max_position_embeddings=32768, rope_scaling=scaling)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        want, want_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        want, want_scale = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    ours = RoPE.from_hf(hf.to_dict(), head_dim=64)
    torch.testing.assert_close(ours.inv_freq, want.float(), rtol=1e-6, atol=0)
    assert ours.attention_scaling == pytest.approx(want_scale)


def test_rotation_is_relative():
    """q·k after rotation depends only on the position difference: kernels rely on this."""
    rope = RoPE.default(64)
    from infinitehip.attention.rope import apply_rope
    q, k = torch.randn(64), torch.randn(64)

    def dot(pq, pk):
        cq, sq = rope.cos_sin(torch.tensor(pq))
        ck, sk = rope.cos_sin(torch.tensor(pk))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(dot(1000, 990), dot(10, 0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dot(1000, 990), dot(1000, 900), rtol=1e-3)
