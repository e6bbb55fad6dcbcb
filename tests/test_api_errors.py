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
    # bool (a mask passed for lengths: True meant one key) and complex passed as integers
    for bad in (torch.tensor([1.0]), torch.tensor([True]), torch.tensor([400j])):
        with pytest.raises(ValueError, match=r"cache_seqlens must be an integer tensor of shape \(1,\)"):
            hip_attention(q[:, :1], k, v, config=CFG, cache_seqlens=bad)
    with pytest.raises(ValueError, match="refresh_stage=5"):
        hip_attention(q, k, v, config=CFG, refresh_stage=5)
    for bad in (1.5, "1", [0.5]):
        with pytest.raises(ValueError, match="refresh_stage=.* must be an int"):
            hip_attention(q, k, v, config=CFG, refresh_stage=bad)
    with pytest.raises(ValueError, match="backend='cuda'"):
        hip_attention(q, k, v, config=CFG, backend="cuda")
    for bad in ({"sink": 4}, {}):   # an empty dict silently meant the default config
        with pytest.raises(TypeError, match="config must be a HiPConfig"):
            hip_attention(q, k, v, config=bad)
    for bad in (float("nan"), 0.0, -1.0, float("inf"), "a", True):   # NaN gave NaN outputs silently
        with pytest.raises(ValueError, match=r"scale=.* must be a finite number > 0"):
            hip_attention(q, k, v, config=CFG, scale=bad)
    torch.testing.assert_close(hip_attention(q, k, v, config=CFG, scale=2)[0],
                               hip_attention(q, k, v, config=CFG, scale=2.0)[0])
    # numbers of other types were refused as if not finite; a 0-d tensor too
    import numpy as np
    for same in (np.float32(2.0), torch.tensor(2.0)):
        torch.testing.assert_close(hip_attention(q, k, v, config=CFG, scale=same)[0],
                                   hip_attention(q, k, v, config=CFG, scale=2.0)[0])
    with pytest.raises(TypeError, match="rope must be a RoPE"):   # an AttributeError on .head_dim
        hip_attention(q, k, v, config=CFG, rope="x")
    for bad in (True, [False]):   # True ran as stage 1
        with pytest.raises(ValueError, match="not a bool"):
            hip_attention(q, k, v, config=CFG, refresh_stage=bad)


def test_mask_from_another_config_is_rejected():
    q, k, v = qkv(tk=1000)
    _, mask = hip_attention(q, k, v, config=CFG)
    other = CFG.replace(budget=128)
    with pytest.raises(ValueError, match="reusable only with the config and input shapes"):
        hip_attention(q, k, v, config=other, mask=mask, refresh_stage=other.n_stages)



def test_mask_stage_inputs_from_another_config_are_rejected():
    """Masks whose final chunks fit but whose saved stage inputs do not (another stage budget),
    an empty_mask refreshed from a stage it has no input for, or not a mask at all: a clear
    error, not a silently different pruning (or an AttributeError from deep inside)."""
    from infinitehip.attention import empty_mask
    q, k, v = qkv(B=2, tq=1)
    _, mask = hip_attention(q, k, v, config=CFG)
    other = CFG.replace(stage_budgets=(None, 1024, 128))   # same final mask shape, wider stage 1
    with pytest.raises(ValueError, match="reusable only with the config"):
        hip_attention(q, k, v, config=other, mask=mask, refresh_stage=1)
    empty = empty_mask(CFG, 2, 2, 1)
    hip_attention(q, k, v, config=CFG, mask=empty, refresh_stage=CFG.n_stages)   # used as is: fine
    for stage in (1, [CFG.n_stages, 2]):
        with pytest.raises(ValueError, match="no saved input"):
            hip_attention(q, k, v, config=CFG, mask=empty, refresh_stage=stage)
    with pytest.raises(TypeError, match="HiPMask"):
        hip_attention(q, k, v, config=CFG, mask=mask.starts, refresh_stage=CFG.n_stages)


def test_narrow_cache_seqlens_are_compared_without_wrapping():
    """uint8 lengths [200, 255] against Tk = 400 are valid: Tk must not wrap to uint8 (144)."""
    q, k, v = qkv(B=2, tq=1)
    lens = torch.tensor([200, 255], dtype=torch.uint8)
    out, _ = hip_attention(q, k, v, config=CFG, cache_seqlens=lens)
    want, _ = hip_attention(q, k, v, config=CFG, cache_seqlens=lens.long())
    torch.testing.assert_close(out, want)

def test_rope_scaling_errors():
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        RoPE.from_hf({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 64)
    with pytest.raises(ValueError, match="even head_dim"):
        RoPE.default(63)


@pytest.mark.parametrize("head_dim, theta, match", [
    (64, 0, "theta=0 must be a finite number > 0"),            # inf frequencies: NaN outputs, silently
    (64, -10000.0, "theta=-10000.0 must be"),                  # NaN frequencies
    (64, float("nan"), "theta=nan must be"),
    (64, "10000", "theta='10000' must be"),                    # "unsupported operand type(s) for ** or pow()"
    (0, 10000.0, "even head_dim >= 2, got 0"),                 # an empty RoPE
    (64.0, 10000.0, "even head_dim >= 2, got 64.0"),
])
def test_rope_default_refuses_what_gives_no_rotation(head_dim, theta, match):
    with pytest.raises(ValueError, match=match):
        RoPE.default(head_dim, theta)


def test_generate_names_a_model_that_was_not_loaded():
    """generate("path", ...) failed with "'str' object has no attribute 'tokenizer'" deep inside,
    and offload="fp8" offloaded without FP8, silently."""
    import infinitehip as ih

    with pytest.raises(TypeError, match=r"model must be what infinitehip\.load\(path\) returns, got str 'builtin'"):
        ih.generate("builtin", "hi", max_new_tokens=1)
    model = ih.load("builtin", device="cpu")
    with pytest.raises(TypeError, match=r"offload='fp8' must be True, False, None .* OffloadConfig\(fp8=True\)"):
        ih.generate(model, "hi", max_new_tokens=1, offload="fp8")


def test_cache_seqlens_values_are_checked_on_the_cpu():
    """Each row's valid keys must hold its Tq queries and fit the Tk slots: 0 gave NaN, Tk + 100
    a silently different output, Tq > kv_len got around the Tq <= Tk check."""
    q, k, v = qkv()
    tq, tk = q.shape[1], k.shape[1]
    for bad in (tk + 100, 0, -5, tq - 1):
        with pytest.raises(ValueError, match=r"cache_seqlens=\[.*\] must each be in \[Tq, Tk\]"):
            hip_attention(q, k, v, config=CFG, cache_seqlens=torch.tensor([bad]))
    hip_attention(q, k, v, config=CFG, cache_seqlens=torch.tensor([tk]))


@pytest.mark.parametrize("shape", [(0, 1, 4, 64), (1, 1, 0, 64), (1, 1, 4, 0)])
def test_empty_dimensions_are_rejected(shape):
    B, _, H, D = shape
    q = torch.randn(shape)
    k = v = torch.randn(B, 50, max(1, H // 2) if H else 2, D)
    with pytest.raises(ValueError, match="empty input"):
        hip_attention(q, k, v, config=CFG)


def test_triton_backend_on_cpu_tensors_says_so(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        hip_attention(q, k, v, config=CFG, backend="triton")


def test_a_decode_loop_crossing_the_dense_cutoff_passes_back_what_it_got():
    """The README's decode pattern: the first call is dense (short context: mask None), the next
    passes that None back with a reuse stage; it prunes from scratch, the same as stage 0."""
    cfg = CFG.replace(dense_threshold=0)
    q, k, v = qkv(tk=cfg.sink + cfg.window)
    out, mask = hip_attention(q, k, v, config=cfg)
    assert mask is None
    q, k, v = qkv(tk=cfg.sink + cfg.window + 300)
    got, m1 = hip_attention(q, k, v, config=cfg, mask=mask, refresh_stage=cfg.n_stages)
    want, m0 = hip_attention(q, k, v, config=cfg, refresh_stage=0)
    assert torch.equal(got, want) and torch.equal(m1.starts, m0.starts)


def test_reusing_a_mask_past_its_window_slots_is_an_error_not_lost_keys():
    """Four queries a call, the mask reused: the anchored window has slots for
    refresh_intervals[0] + refresh_lag - 1 = 15 positions past the pruning call ("tiny"), so the
    third reusing call (12 positions on) still attends every key a full budget gives (== dense).
    The fourth (16 on) slides the window past the key at the old window start, which only a
    chunk straddling it may hold; before this check the calls went on silently, the fifth 0.013
    off dense, the seventh 0.033."""
    cfg = HiPConfig.preset("tiny", stage_budgets=(None, 4096, 4096), budget=4096, dense_layer_budget=4096,
                           rope_prune="exact", rope_attend="exact", dense_threshold=0)
    g = torch.Generator().manual_seed(0)
    B, H, K, D, n0 = 1, 2, 1, 16, 600
    q = torch.randn(B, n0 + 64, H, D, generator=g)
    k, v = (torch.randn(B, n0 + 64, K, D, generator=g) for _ in range(2))

    def call(n, mask=None, stage=0):
        return hip_attention(q[:, n - 4:n], k[:, :n], v[:, :n], config=cfg, mask=mask, refresh_stage=stage)

    def dense(n):
        return torch.nn.functional.scaled_dot_product_attention(
            q[:, n - 4:n].transpose(1, 2), k[:, :n].transpose(1, 2).expand(B, H, n, D),
            v[:, :n].transpose(1, 2).expand(B, H, n, D), is_causal=False,
            attn_mask=torch.ones(4, n, dtype=torch.bool).tril(n - 4)).transpose(1, 2)

    _, mask = call(n0)
    for step in (1, 2, 3):
        out, mask = call(n0 + 4 * step, mask, cfg.n_stages)
        torch.testing.assert_close(out, dense(n0 + 4 * step), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="16 positions after the call that last ran stage 0.*at most 3 calls"):
        call(n0 + 16, mask, cfg.n_stages)
    out, _ = call(n0 + 16, mask, 0)      # pruned again: fine
    torch.testing.assert_close(out, dense(n0 + 16), atol=1e-4, rtol=1e-4)
