"""transformers drop-in: ``import infinitehip.hf`` registers ``attn_implementation="infinitehip"``.

    import infinitehip.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="infinitehip")
    infinitehip.hf.set_config(model, HiPConfig.preset("fast"))     # optional; default "paper"

Limits (see docs/engine.md): transformers hands the attention function queries and keys it has
already rotated at their true positions, so pruning and attention use exact positions — adaptive
RoPE (relative pruning, streaming attention) is not available here, and past the model's trained
length it degrades like dense attention would. Every decode step prunes from scratch (no mask
reuse), padding masks are ignored (one sequence, or equal lengths, per batch), sliding-window
layers attend like every other layer. For all of InfiniteHiP use ``infinitehip.load``.
"""
from __future__ import annotations

import torch

from .attention import hip_attention
from .config import HiPConfig

NAME = "infinitehip"
_default = HiPConfig.preset("paper")


def infinitehip_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, Tq, D), key/value (B, K, Tk, D), RoPE applied.

    The queries are the last Tq of each row's valid keys (causal): all Tk of them, or with a
    preallocated (static) cache, which passes no mask, the keys up to the last query's position
    (``position_ids``). Returns ((B, Tq, H, D), None).
    """
    config = getattr(module, "_hip_config", None)
    if config is None:
        n_layers = getattr(getattr(module, "config", None), "num_hidden_layers", 1)
        config = _default.for_layer(getattr(module, "layer_idx", 0) or 0, n_layers)
    q = query.transpose(1, 2)                                            # (B, Tq, H, D)
    k = key.transpose(1, 2).contiguous()                                 # (B, Tk, K, D)
    v = value.transpose(1, 2).contiguous()
    lens, pos = None, kwargs.get("position_ids")
    if pos is not None and pos.numel():
        n = (pos[:, -1].long() + 1).expand(q.shape[0])                 # keys up to each row's last query
        if bool((n < k.shape[1]).any()):   # a static cache: the slots past them hold nothing yet
            lens = n.to(k.device)
    out, _ = hip_attention(q, k, v, config=config, rope=None, scale=scaling, cache_seqlens=lens)
    return out, None


def set_config(model: torch.nn.Module | None = None, config: HiPConfig | str = "paper"):
    """Use ``config`` (a HiPConfig or preset name) for ``model``'s layers, or for every model if None."""
    global _default
    config = HiPConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(config, HiPConfig):
        raise TypeError(f"config must be a HiPConfig or a preset name, got {type(config).__name__}")
    if model is None:
        _default = config
        return
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
    if not attention:
        raise ValueError("no attention modules with a layer_idx found in this model")
    for m in attention:
        m._hip_config = config.for_layer(m.layer_idx, m.config.num_hidden_layers)


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, infinitehip_attention)


_register()
