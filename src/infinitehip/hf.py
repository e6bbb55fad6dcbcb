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

import threading
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .attention import HiPMask, RoPE, hip_attention
from .config import HiPConfig
from .models.llama import trained_context

NAME = "infinitehip"
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
    upto = _keys_upto(kwargs.get("position_ids"), query.shape[0])
    _check_supported(module, attention_mask, dropout, kwargs, key.shape[2], upto)
    if kwargs.get("sliding_window"):
        # transformers' cache keeps only a sliding layer's window, so its decode steps could not see
        # more: the layer attends as sdpa does (densely within the window, which bounds its cost).
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    config = getattr(module, "_hip_config", None)
    if config is None:
        n_layers = getattr(getattr(module, "config", None), "num_hidden_layers", 1)
        config = _default.for_layer(getattr(module, "layer_idx", 0) or 0, n_layers)
    q = query.transpose(1, 2)                                            # (B, Tq, H, D)
    k = key.transpose(1, 2).contiguous()                                 # (B, Tk, K, D)
    v = value.transpose(1, 2).contiguous()
    # A static cache: the slots past each row's last query hold nothing yet.
    lens = upto.to(k.device) if upto is not None and bool((upto < k.shape[1]).any()) else None
    cache = _cache_of(module, key)
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


def _check_supported(module, attention_mask, dropout: float, kwargs: dict, tk: int, upto: torch.Tensor | None):
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
    if attention_mask is not None and attention_mask.dim() == 4 and _padded(attention_mask, upto, tk,
                                                                             kwargs.get("sliding_window")):
        raise ValueError("attn_implementation='infinitehip' does not take padded batches (a row's padding would be "
                         "attended): give sequences of equal length, one per call, or use infinitehip.generate, "
                         "which batches prompts of any lengths")
    pos = kwargs.get("position_ids")
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
    """Use ``config`` (a HiPConfig or preset name) for ``model``'s layers, or for every model if None."""
    global _default
    config = HiPConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(config, HiPConfig):
        raise TypeError(f"config must be a HiPConfig or a preset name, got {type(config).__name__}")
    if model is None:
        _default = config
        return
    for m in _attention_modules(model):
        m._hip_config = _layer_config(m, config)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
    if not attention:
        raise ValueError("no attention modules with a layer_idx found in this model")
    return attention


def _layer_config(module: torch.nn.Module, config: HiPConfig) -> HiPConfig:
    """``config`` for the module's layer; with un-rotated keys (``HiPCache``), positions are exact
    up to the model's trained length, as ``infinitehip.load`` sets them."""
    config = config.for_layer(module.layer_idx, module.config.num_hidden_layers)
    context = getattr(module, "_hip_context", None)
    if context and config.model_context_length is None:
        config = config.replace(model_context_length=context)
    return config


@dataclass
class _LayerMask:
    mask: HiPMask | None   # what the layer's last decode step attended with (None: dense, or a prefill)
    step: int              # decode steps since that mask was pruned from scratch
    rows: int
    keys: int              # valid keys the call read


_pending = threading.local()   # the HiPCache update just made, for the attention call that follows it


class HiPCache(DynamicCache):
    """A transformers cache that lets the drop-in work as InfiniteHiP does in ``infinitehip.load``.

        cache = infinitehip.hf.HiPCache(model)
        model.generate(ids, past_key_values=cache, max_new_tokens=64)

    - Keys are cached **without RoPE**: making a HiPCache turns the model's rotary embedding into
      the identity while its attention implementation is "infinitehip" (once per model,
      ``_unrotate``), and attention rotates queries and keys itself at adaptive positions (exact
      within the trained length, beyond it as the config's ``rope_*`` modes say), so the model
      reads past its trained context.
    - Each layer's **sparse mask is reused** across decode steps (one token a call), its stages
      rerun by the config's ``refresh_intervals``; a prefill, a dense call or any change of the
      rows (beam reordering, crop, batch selection) prunes from scratch next.
    """

    def __init__(self, model: torch.nn.Module):
        _unrotate(model)
        super().__init__(config=model.config)
        self._masks: dict[int, _LayerMask] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        _pending.update = (self, layer_idx, keys)
        return keys, values

    def reuse(self, layer: int, config: HiPConfig, shape: tuple[int, int], keys: int):
        """(mask, refresh_stage, step) for a call of ``shape`` (B, Tq) reading ``keys`` keys: the
        layer's last mask and the schedule's stage when this call is the next decode step of the
        same rows, else (None, 0, 0): prune from scratch."""
        last = self._masks.get(layer)
        rows, tq = shape
        if tq != 1 or last is None or last.mask is None or (last.rows, last.keys + 1) != (rows, keys):
            return None, 0, 0
        return last.mask, config.refresh_stage(last.step + 1), last.step + 1

    def keep(self, layer: int, mask: HiPMask | None, tq: int, step: int, rows: int, keys: int):
        # A prefill's mask is not kept: the first decode step prunes from scratch with its own
        # query (the prompt's mask pooled a whole query block), as infinitehip.load's decode does.
        self._masks[layer] = _LayerMask(mask if tq == 1 else None, step, rows, keys)


def _forgets_masks(name: str):
    def method(self, *args, **kwargs):
        self._masks.clear()    # the rows or their keys changed: the masks no longer describe them
        return getattr(DynamicCache, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


for _name in ("reset", "crop", "reorder_cache", "batch_repeat_interleave", "batch_select_indices"):
    if hasattr(DynamicCache, _name):
        setattr(HiPCache, _name, _forgets_masks(_name))


def _cache_of(module: torch.nn.Module, key: torch.Tensor) -> HiPCache | None:
    """The HiPCache whose update returned ``key`` for this layer just now, if any."""
    pending, _pending.update = getattr(_pending, "update", None), None
    if pending is not None and pending[1] == getattr(module, "layer_idx", None) and pending[2] is key:
        return pending[0]
    return None


def _unrotate(model: torch.nn.Module):
    """Make ``model``'s rotary embedding the identity while its attention is "infinitehip" (so
    queries and keys reach the cache and attention un-rotated) and give each attention module the
    RoPE to apply inside (``_hip_rope``) and the trained length. Refuses what it cannot reproduce:
    another attention implementation, sliding-window layers, a RoPE infinitehip does not compute
    exactly as the model does."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != NAME:
        raise ValueError(f"HiPCache is for models loaded with attn_implementation={NAME!r} (this one uses "
                         f"{getattr(config, '_attn_implementation', None)!r}); load it with that argument")
    rotary = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotary) != 1:
        raise ValueError(f"HiPCache needs a model with one rotary embedding module; this one has {len(rotary)}: "
                         "use the drop-in without it (keys rotated by transformers)")
    rotary = rotary[0]
    if getattr(rotary, "_hip_identity", False):
        return
    if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers):
        raise ValueError("HiPCache does not take models with sliding-window layers (transformers' cache keeps "
                         "only their window): use the drop-in without it, or infinitehip.load")
    cfg = config.get_text_config().to_dict()
    attention = _attention_modules(model)
    rope = RoPE.from_hf(cfg, attention[0].head_dim)          # an unsupported rope type: a clear error
    _check_same_rope(rotary, rope, cfg)
    original = rotary.forward

    def forward(x, position_ids, *args, **kwargs):
        cos, sin = original(x, position_ids, *args, **kwargs)
        if config._attn_implementation != NAME:   # switched to another implementation: rotate as usual
            return cos, sin
        return torch.ones_like(cos), torch.zeros_like(sin)

    rotary.forward, rotary._hip_identity = forward, True
    for m in attention:
        m._hip_rope, m._hip_context = rope, trained_context(cfg)
        m._hip_config = _layer_config(m, getattr(m, "_hip_config", None) or _default)


def _check_same_rope(rotary: torch.nn.Module, rope: RoPE, cfg: dict):
    """Our rotation must be the model's, or un-rotated keys would be rotated wrongly."""
    device = next(iter(rotary.buffers()), torch.empty(0)).device
    pos = torch.tensor([[0, 1, 5, 100, 1000, 4095]], device=device)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32, device=device), pos)     # (1, P, D)
    ours = rope.cos_sin(pos)                                                        # (1, P, D/2) each
    half = rope.head_dim // 2
    if cos.shape[-1] != rope.head_dim or not all(
            torch.allclose(theirs[..., :half].float().cpu(), mine.cpu(), atol=1e-4)
            and torch.allclose(theirs[..., half:].float().cpu(), mine.cpu(), atol=1e-4)
            for theirs, mine in ((cos, ours[0]), (sin, ours[1]))):
        kind = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}.get("rope_type", "default")
        raise ValueError(f"this model's rotary embedding (rope type {kind!r}) differs from the RoPE infinitehip "
                         "computes from its config, so HiPCache cannot take over the rotation: use the drop-in "
                         "without it")


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, infinitehip_attention)
    # SDPA's masks: None for an unpadded causal batch (nothing built), so a padded one is seen.
    AttentionMaskInterface.register(NAME, sdpa_mask)


_register()
