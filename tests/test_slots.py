"""Decode over a slot buffer (``attention/triton/slots.py``, Triton interpreter on CPU) against
the reference's mask-reuse decode: the kernels directly over several steps (each step's own key
put into its window slot by the step), and ``hip_attention`` over a refresh schedule."""
import pytest
import torch

from infinitehip import HiPConfig, RoPE, hip_attention

slots = pytest.importorskip("infinitehip.attention.triton.slots")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = HiPConfig.preset("tiny", chunk_sizes=(32, 8), stage_budgets=(None, 256), stage_strides=(2, 1),
                       refresh_intervals=(8, 4))


def decode_inputs(steps: int, D: int = 64, seed: int = 3):
    """Two rows (900 and 200 keys at the first step: the short one leaves selected slots empty)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, steps, 8, D, generator=g).to(DEVICE)
    k, v = (torch.randn(2, 900 + steps, 2, D, generator=g).to(DEVICE) for _ in range(2))
    return q, k, v, torch.tensor([900, 200], device=DEVICE)


def reuse_steps_match(cfg, q, k, v, lens, rope):
    """Step 0 prunes (a decode refresh, reference) and the slots are built; every step, 0 on,
    then reuses both: each as the reference's mask reuse. Returns the slots."""
    _, mask = hip_attention(q[:, :1], k, v, config=cfg, rope=rope, cache_seqlens=lens, backend="reference")
    buf = slots.build_slots(k, v, mask, lens, cfg, rope)
    for i in range(q.shape[1]):
        kv_len = lens + i
        want, _ = hip_attention(q[:, i:i + 1], k, v, config=cfg, rope=rope, cache_seqlens=kv_len, mask=mask,
                                refresh_stage=cfg.n_stages, backend="reference")
        got = slots.attend_slots(q[:, i:i + 1], k, v, buf, mask, kv_len, cfg, rope, 64 ** -0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {i}")
    return buf


@pytest.mark.parametrize("rope_attend,scaling", [("streaming", 1.0), ("exact", 1.0), ("streaming", 1.25)])
def test_slot_steps_match_the_reused_mask(rope_attend, scaling):
    cfg = CFG.replace(rope_attend=rope_attend)
    q, k, v, lens = decode_inputs(4)
    rope = RoPE(RoPE.default(64).inv_freq.to(DEVICE), attention_scaling=scaling)
    # Step 0 prunes (a decode refresh) and builds the slots; steps 1.. reuse both.
    buf = reuse_steps_match(cfg, q, k, v, lens, rope)
    assert (buf.ok != 0).any() and (buf.ok == 0).any(), "valid and empty fixed slots, or the test means little"


def test_hip_attention_decodes_through_slots():
    """The Triton backend builds slots at each refresh and reads them in reuse steps: the same
    outputs as the reference over a refresh schedule (every stage refreshed at least once)."""
    cfg, steps = CFG, 9
    q, k, v, lens = decode_inputs(steps, seed=5)
    rope = RoPE.default(64)
    want_mask = got_mask = None
    for step in range(steps):
        kv_len, stage = lens + step, cfg.refresh_stage(step)
        args = dict(config=cfg, rope=rope, cache_seqlens=kv_len, refresh_stage=stage)
        want, want_mask = hip_attention(q[:, step:step + 1], k, v, mask=want_mask, backend="reference", **args)
        got, got_mask = hip_attention(q[:, step:step + 1], k, v, mask=got_mask, backend="triton", **args)
        assert got_mask.slots is not None and torch.equal(got_mask.starts, want_mask.starts)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {step} (stage {stage})")


def test_a_row_crossing_the_trained_context_between_refreshes():
    """With "auto" RoPE a row whose context passes the trained length between refreshes moves its
    sink and selected keys from exact to streaming positions: reuse steps follow it."""
    cfg = CFG.replace(model_context_length=901)     # row 0: 900, 901 keys exact; 902, 903 not
    q, k, v, lens = decode_inputs(4, seed=7)
    rope = RoPE.default(64)
    reuse_steps_match(cfg, q, k, v, lens, rope)


def test_slots_are_for_one_query_per_row():
    q, k, _, _ = decode_inputs(2)
    assert slots.usable(q[:, :1], k, CFG) and not slots.usable(q, k, CFG)
