"""Bad input to hip_attention gets an error that says what to change."""
import pytest
import torch

from infinitehip import HiPConfig, RoPE, hip_attention

CFG = HiPConfig.preset("tiny")


def qkv(B=1, tq=4, tk=400, H=4, K=2, D=64, dtype=torch.float32):
    return torch.randn(B, tq, H, D, dtype=dtype), torch.randn(B, tk, K, D, dtype=dtype), torch.randn(B, tk, K, D, dtype=dtype)


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(4, 64), *qkv()[1:]), "q must be a 4-D tensor"),
    (lambda: (qkv()[0].to(torch.int32), *qkv()[1:]), "use float16, bfloat16 or float32"),
    (lambda: (qkv()[0].half(), *qkv()[1:]), "must share one dtype"),
    (lambda: (qkv()[0], qkv()[1], qkv(tk=300)[2]), "k and v must have the same shape"),
    (lambda: qkv(H=6, K=4), "not a multiple of 4 kv heads"),
    (lambda: (qkv()[0], *qkv(B=2)[1:]), "batch"),
    (lambda: (qkv(D=128)[0], *qkv()[1:]), "head_dim"),
    (lambda: qkv(D=512), "at most 256"),
    (lambda: qkv(tq=500, tk=400), "queries are the last Tq key positions"),
])
def test_bad_tensors(make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        hip_attention(q, k, v, config=CFG)


def test_bad_arguments():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="rope is for head_dim 128"):
        hip_attention(q, k, v, config=CFG, rope=RoPE.default(128))
    with pytest.raises(ValueError, match=r"cache_seqlens must be an integer tensor of shape \(1,\)"):
        hip_attention(q, k, v, config=CFG, cache_seqlens=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="refresh_stage=5"):
        hip_attention(q, k, v, config=CFG, refresh_stage=5)
    with pytest.raises(ValueError, match="pass the mask a previous call returned"):
        hip_attention(q, k, v, config=CFG, refresh_stage=1)
    with pytest.raises(ValueError, match="backend='cuda'"):
        hip_attention(q, k, v, config=CFG, backend="cuda")
    with pytest.raises(TypeError, match="config must be a HiPConfig"):
        hip_attention(q, k, v, config={"sink": 4})


def test_mask_from_another_config_is_rejected():
    q, k, v = qkv(tk=1000)
    _, mask = hip_attention(q, k, v, config=CFG)
    other = CFG.replace(budget=128)
    with pytest.raises(ValueError, match="was it made with another config"):
        hip_attention(q, k, v, config=other, mask=mask, refresh_stage=other.n_stages)


def test_rope_scaling_errors():
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        RoPE.from_hf({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 64)
    with pytest.raises(ValueError, match="even head_dim"):
        RoPE.default(63)
