"""`infinitehip demo`: a needle planted deep in a long context, found by hierarchical pruning."""
from __future__ import annotations

import time

import torch

from .attention import dense_attention, empty_mask, hip_attention
from .attention.mask import SENTINEL
from .config import HiPConfig


def attention_needle(context: int = 262_144, depth: float = 0.3, seed: int = 0, device: str = "cpu") -> dict:
    """Decode one query over ``context`` random keys, one chunk of which matches it strongly.

    Returns what each method puts in the output: the needle's value is 1 on every dim, the
    haystack's values are 0 mean, so the output's mean says how much of the needle was read.
    """
    g = torch.Generator().manual_seed(seed)
    H, K, D = 32, 8, 128
    q = torch.randn(1, 1, H, D, generator=g)
    k = torch.randn(1, context, K, D, generator=g)
    v = torch.randn(1, context, K, D, generator=g)
    at = int(context * depth) // 8 * 8
    k[:, at:at + 8] = q[0, 0, ::H // K]      # one 8-token chunk matches each kv head's first query head
    v[:, at:at + 8] = 1.0
    q, k, v = (x.to(device) for x in (q, k, v))
    cfg, rope = HiPConfig(), None  # keys compared by content alone: no RoPE at this level
    rows = {}
    t = time.perf_counter()
    out, mask = hip_attention(q, k, v, config=cfg, rope=rope)
    rows["hip"] = (out, time.perf_counter() - t)
    found = bool(((mask.starts >= at) & (mask.starts < at + 8) & (mask.starts != SENTINEL)).any())
    t = time.perf_counter()
    out = dense_attention(q, k, v, torch.tensor([context], device=device), rope, D ** -0.5)
    rows["dense"] = (out, time.perf_counter() - t)
    t = time.perf_counter()
    blind = empty_mask(cfg, 1, mask.starts.shape[1], 1, device)
    out, _ = hip_attention(q, k, v, config=cfg, rope=rope, mask=blind, refresh_stage=cfg.n_stages)
    rows["sink+window"] = (out, time.perf_counter() - t)
    return {"context": context, "needle_at": at, "needle_selected": found,
            "methods": {name: {"needle_weight": float(o[0, 0, ::H // K].float().mean()), "seconds": s}
                        for name, (o, s) in rows.items()}}
