"""The slot-buffer decode prototype (``attention/triton/slots.py``, Triton interpreter on CPU)
against the reference's mask-reuse decode, over several steps after the build: each step's new
key appended to its window slot, the query rotated at p0 - p_ref."""
import pytest
import torch

from infinitehip import HiPConfig, RoPE, hip_attention

slots = pytest.importorskip("infinitehip.attention.triton.slots")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = HiPConfig.preset("tiny", chunk_sizes=(32, 8), stage_budgets=(None, 256), stage_strides=(2, 1),
                       refresh_intervals=(8, 4))


@pytest.mark.parametrize("rope_attend,scaling", [("streaming", 1.0), ("exact", 1.0), ("streaming", 1.25)])
def test_slot_decode_matches_the_reused_mask(rope_attend, scaling):
    cfg = CFG.replace(rope_attend=rope_attend)
    B, H, K, D, steps = 2, 8, 2, 64, 4
    lens = torch.tensor([900, 200], device=DEVICE)        # the short row leaves selected slots empty
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, steps, H, D, generator=g).to(DEVICE)
    k, v = (torch.randn(B, 900 + steps, K, D, generator=g).to(DEVICE) for _ in range(2))
    rope = RoPE(RoPE.default(D).inv_freq.to(DEVICE), attention_scaling=scaling)
    # Step 0 prunes (a decode refresh) and builds the slots; steps 1.. reuse both.
    _, mask = hip_attention(q[:, :1], k, v, config=cfg, rope=rope, cache_seqlens=lens, backend="reference")
    buf = slots.build_slots(k, v, mask, lens, cfg, rope)
    assert (buf.ok != 0).any() and (buf.ok == 0).any(), "valid and empty fixed slots, or the test means little"
    rows = torch.arange(B, device=DEVICE)
    for i in range(steps):
        kv_len = lens + i
        if i:
            slots.append_slots(buf, k[rows, kv_len - 1], v[rows, kv_len - 1], kv_len, mask, cfg, rope)
        want, _ = hip_attention(q[:, i:i + 1], k, v, config=cfg, rope=rope, cache_seqlens=kv_len, mask=mask,
                                refresh_stage=cfg.n_stages, backend="reference")
        got = slots.attend_slots(q[:, i:i + 1], buf, mask, kv_len, cfg, rope, D ** -0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {i}")


def test_slot_decode_rejects_what_it_does_not_do():
    cfg, rope = CFG, RoPE.default(64)
    k = torch.randn(1, 300, 2, 64, device=DEVICE)
    _, mask = hip_attention(torch.randn(1, 1, 8, 64, device=DEVICE), k, k, config=cfg, rope=rope, backend="reference")
    buf = slots.build_slots(k, k, mask, torch.tensor([300], device=DEVICE), cfg, rope)
    with pytest.raises(ValueError, match="one query per row"):
        slots.attend_slots(torch.randn(1, 2, 8, 64, device=DEVICE), buf, mask, torch.tensor([300], device=DEVICE),
                           cfg, rope, 0.125)
