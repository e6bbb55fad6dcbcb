"""transformers drop-in: ``import infinitehip.hf`` registers ``attn_implementation="infinitehip"``.

    import infinitehip.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="infinitehip")
    infinitehip.hf.set_config(model, HiPConfig.preset("fast"))     # optional; default "paper"
    out = model.generate(ids, past_key_values=infinitehip.hf.HiPCache(model), max_new_tokens=64)

Two levels (see docs/engine.md). The attention function alone gets the queries and keys that
transformers rotated at their true positions: sparse attention at exact positions, pruned from
scratch every step, so past the model's trained length it degrades like dense attention would.
``HiPCache`` adds what InfiniteHiP needs: keys cached without RoPE, which attention rotates at
adaptive positions (the model reads past its trained length, as ``infinitehip.load`` does), and
each layer's mask reused across decode steps by the config's refresh schedule. Either way padded
batches are refused (one sequence, or equal lengths, per batch), sliding-window layers attend as
sdpa does (dense within their window; with ``HiPCache`` they are refused), and soft-capping,
attention sinks, packed sequences, output_attentions and encoders are refused.
For all of InfiniteHiP (paged cache, CUDA graphs, offload) use ``infinitehip.load``.
"""
from __future__ import annotations

import functools

import torch

from ..attention import hip_attention
from ..config import HiPConfig
from .cache import NAME, HiPCache, attention_modules, cache_of

__all__ = ["HiPCache", "NAME", "infinitehip_attention", "set_config"]
_default = HiPConfig.preset("paper")


def infinitehip_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, Tq, D), key/value (B, K, Tk, D); RoPE applied
    by transformers, or, once a ``HiPCache`` was made for the model, not (``module._hip_rope``).

    The queries are the last Tq of each row's valid keys (causal): all Tk of them, or with a
    preallocated (static) cache, which passes no mask, the keys up to the last query's position
    (``position_ids``). Returns ((B, Tq, H, D), None).
    """
    _check_supported(module, attention_mask, dropout, kwargs, query.shape[0], key.shape[2])
    if kwargs.get("sliding_window"):
        # transformers' cache keeps only a sliding layer's window, so its decode steps could not see
        # more: the layer attends as sdpa does (densely within the window, which bounds its cost).
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    cache = cache_of(module, key)
    if cache is not None and not hasattr(module, "_hip_rope"):
        # This model's keys were rotated by transformers: attention would add no rotation of its
        # own, and the cache would silently run the drop-in without adaptive RoPE.
        raise ValueError("this HiPCache was made for another model: make one for the model it is passed to, "
                         "infinitehip.hf.HiPCache(model)")
    config = _module_config(module)
    q = query.transpose(1, 2)                                            # (B, Tq, H, D)
    k = key.transpose(1, 2)                # (B, Tk, K, D): HiPCache's buffer, read in place
    v = value.transpose(1, 2)
    # A static cache: the slots past each row's last query hold nothing yet. A HiPCache holds just
    # the keys written, so its steps skip the check (a host sync per layer, which kept the CPU
    # from queueing the next layer's launches while the GPU ran this one's) and the few launches
    # that find each row's last position.
    upto = None if cache is not None else _keys_upto(kwargs.get("position_ids"), query.shape[0])
    static = upto is not None and bool((upto < k.shape[1]).any())
    lens = upto.to(k.device) if static else None
    keys = k.shape[1] if lens is None else int(lens.max())
    mask, stage, step = cache.reuse(module.layer_idx, config, q.shape[:2], keys) if cache else (None, 0, 0)
    out, mask = hip_attention(q, k, v, config=config, rope=getattr(module, "_hip_rope", None), scale=scaling,
                              cache_seqlens=lens, mask=mask, refresh_stage=stage)
    if cache:
        cache.keep(module.layer_idx, mask, q.shape[1], step, q.shape[0], keys)
    return out, None


def _keys_upto(pos: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """(B,) keys up to each row's last query, from ``position_ids``; None without them."""
    if pos is None or not pos.numel():
        return None
    return (pos[:, -1].long() + 1).expand(batch)


def _check_supported(module, attention_mask, dropout: float, kwargs: dict, rows: int, tk: int):
    """What this function cannot reproduce is an error, not a silently different answer: logit
    soft-capping (Gemma 2), attention sinks, attention weights (output_attentions), bidirectional
    (encoder) attention, dropout while training, padded batches (a padded row's valid keys are not
    the last ones: left-padded rows attended their padding) and packed sequences (several per row,
    told by position_ids)."""
    for name in ("softcap", "sinks", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='infinitehip' cannot apply {name} (this model uses it); "
                             "load it with another attention implementation")
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='infinitehip' computes no attention weights (output_attentions=True): "
                         "load the model with attn_implementation='eager' to get them")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError("attn_implementation='infinitehip' is causal attention; this model's attention is "
                         "bidirectional (an encoder)")
    if module.training and dropout:   # a named parameter above: never in kwargs
        raise ValueError("attn_implementation='infinitehip' has no attention dropout: it is for inference (model.eval())")
    pos = kwargs.get("position_ids")
    if attention_mask is not None and attention_mask.dim() == 4 and _padded(attention_mask, _keys_upto(pos, rows),
                                                                             tk, kwargs.get("sliding_window")):
        raise ValueError("attn_implementation='infinitehip' does not take padded batches (a row's padding would be "
                         "attended): give sequences of equal length, one per call, or use infinitehip.generate, "
                         "which batches prompts of any lengths")
    if pos is not None and pos.shape[-1] > 1 and bool((pos.diff(dim=-1) != 1).any()):
        raise ValueError("attn_implementation='infinitehip' does not take packed sequences (position_ids that restart "
                         "or jump within a row): its queries are the last keys of one sequence per row; give one "
                         "sequence per row")


def _padded(mask: torch.Tensor, upto: torch.Tensor | None, tk: int, window: int | None = None) -> bool:
    """Whether some row has a key that every query is masked from though causality would show it
    to the last (among the first ``upto`` keys, else all Tk; with a sliding window, among the last
    ``window`` of those): padding. mask (B, 1, Tq, >= Tk): bool (True = attend) or additive float
    (0 = attend)."""
    m = mask[:, 0, :, :tk]                                                     # (B, Tq, Tk)
    hidden = (~m if m.dtype == torch.bool else m < 0).all(dim=1)               # (B, Tk)
    limit = torch.full((m.shape[0],), tk, device=m.device) if upto is None else upto.to(m.device).clamp(max=tk)
    keys = torch.arange(tk, device=m.device)
    shown = keys < limit[:, None]
    if window:   # a sliding cache holds keys up to the last query: the last `window` of them are shown to it
        shown &= keys >= limit[:, None] - window
    return bool((hidden & shown).any())


def set_config(model: torch.nn.Module | None = None, config: HiPConfig | str = "paper"):
    """Use ``config`` (a HiPConfig or preset name) for ``model``'s layers, or, if None, for every
    model not given its own. Read at each attention call: it takes effect at once, HiPCache or not."""
    global _default
    config = HiPConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(config, HiPConfig):
        raise TypeError(f"config must be a HiPConfig or a preset name, got {type(config).__name__}")
    if model is None:
        _default = config
        return
    for m in attention_modules(model):
        m._hip_config = config


def _module_config(module: torch.nn.Module) -> HiPConfig:
    """The config an attention call runs: the model's (``set_config(model, ...)``), else the
    global default as it is now, resolved per call so that a later ``set_config`` -- before or
    after a HiPCache was made, for the model or for all -- takes effect."""
    n_layers = getattr(getattr(module, "config", None), "num_hidden_layers", 1)
    return _layer_config(getattr(module, "_hip_config", None) or _default, getattr(module, "layer_idx", 0) or 0,
                         n_layers, getattr(module, "_hip_context", None))


@functools.lru_cache(maxsize=1024)
def _layer_config(config: HiPConfig, layer: int, n_layers: int, context: int | None) -> HiPConfig:
    """``config`` for one layer; with un-rotated keys (``HiPCache``: ``context`` is the model's
    trained length), positions are exact up to the trained length, as ``infinitehip.load`` sets
    them, unless the config names its own ``model_context_length``. Cached: one call per layer
    per step."""
    config = config.for_layer(layer, n_layers)
    if context and config.model_context_length is None:
        config = config.replace(model_context_length=context)
    return config


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, infinitehip_attention)
    # SDPA's masks: None for an unpadded causal batch (nothing built), so a padded one is seen.
    AttentionMaskInterface.register(NAME, sdpa_mask)


_register()
