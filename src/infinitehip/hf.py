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
    cache = _cache_of(module, key)
    if cache is not None and not hasattr(module, "_hip_rope"):
        # This model's keys were rotated by transformers: attention would add no rotation of its
        # own, and the cache would silently run the drop-in without adaptive RoPE.
        raise ValueError("this HiPCache was made for another model: make one for the model it is passed to, "
                         "infinitehip.hf.HiPCache(model)")
    config = _module_config(module)
    q = query.transpose(1, 2)                                            # (B, Tq, H, D)
    k = key.transpose(1, 2).contiguous()                                 # (B, Tk, K, D)
    v = value.transpose(1, 2).contiguous()
    # A static cache: the slots past each row's last query hold nothing yet.
    lens = upto.to(k.device) if upto is not None and bool((upto < k.shape[1]).any()) else None
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
    """Use ``config`` (a HiPConfig or preset name) for ``model``'s layers, or, if None, for every
    model not given its own. Read at each attention call: it takes effect at once, HiPCache or not."""
    global _default
    config = HiPConfig.preset(config) if isinstance(config, str) else config
    if not isinstance(config, HiPConfig):
        raise TypeError(f"config must be a HiPConfig or a preset name, got {type(config).__name__}")
    if model is None:
        _default = config
        return
    for m in _attention_modules(model):
        m._hip_config = config


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
    if not attention:
        raise ValueError("no attention modules with a layer_idx found in this model")
    return attention


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
      rerun by the config's ``refresh_intervals``; beam reordering and batch selection move each
      row's mask with its keys; a prefill, a dense call or a crop prunes from scratch next.
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

    def reset(self):
        self._masks.clear()    # a new sequence: nothing to reuse
        super().reset()

    def crop(self, tokens_to_remove: int):
        # Keys dropped (assisted decoding's rejected draft): the masks no longer describe them. A
        # crop(0) drops none (transformers calls it every step where it defers the stop check).
        if tokens_to_remove:
            self._masks.clear()
        super().crop(tokens_to_remove)

    # Row selections move each row's mask with its keys, so beam search (a reordering every step)
    # keeps reusing masks by the refresh schedule instead of pruning from scratch every step.
    def reorder_cache(self, beam_idx: torch.Tensor):
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        self._select_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])
        super().batch_select_indices(indices)

    def _select_rows(self, pick):
        """Each layer's mask after ``pick`` (rows of a (B, ...) tensor -> the new rows)."""
        for layer in self._masks.values():
            layer.rows = len(pick(torch.arange(layer.rows)))
            if layer.mask is not None:
                m = layer.mask
                layer.mask = HiPMask(pick(m.starts), tuple(None if t is None else pick(t) for t in m.stage_inputs),
                                     None if m.w0 is None else pick(m.w0))


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
    rope = _rope_of(cfg, _head_dim(attention[0], cfg), rotary)
    original = rotary.forward

    def forward(x, position_ids, *args, **kwargs):
        cos, sin = original(x, position_ids, *args, **kwargs)
        if config._attn_implementation != NAME:   # switched to another implementation: rotate as usual
            return cos, sin
        return torch.ones_like(cos), torch.zeros_like(sin)

    rotary.forward, rotary._hip_identity = forward, True
    for m in attention:
        # A layer without position embeddings (SmolLM3's and Llama 4's no_rope_layers: use_rope
        # False) got no rotation from transformers and gets none inside either.
        m._hip_rope = rope if getattr(m, "use_rope", True) else None
        m._hip_context = trained_context(cfg)


def _head_dim(module: torch.nn.Module, cfg: dict) -> int:
    """The attention heads' size: the module's (``head_dim``; GPT-NeoX's ``head_size``), else the config's."""
    for size in (getattr(module, "head_dim", None), getattr(module, "head_size", None), cfg.get("head_dim")):
        if size:
            return int(size)
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def _rope_of(cfg: dict, head_dim: int, rotary: torch.nn.Module) -> RoPE:
    """The RoPE attention applies in place of the model's rotary embedding, checked to be the
    same rotation; on the rotary embedding's device (not copied there at every call)."""
    try:
        rope = RoPE.from_hf(cfg, head_dim)
        why = _differs(rotary, rope, cfg)
    except ValueError as e:   # a rope type infinitehip lacks (dynamic, longrope), partial rotary, ...
        why = str(e)
    if why:
        raise ValueError(f"HiPCache cannot take over this model's rotary embedding: {why}. Use the drop-in "
                         "without HiPCache (transformers rotates the keys, at exact positions)")
    return RoPE(rope.inv_freq.to(_device_of(rotary)), rope.attention_scaling)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(iter(module.buffers()), torch.empty(0)).device


def _differs(rotary: torch.nn.Module, rope: RoPE, cfg: dict) -> str | None:
    """How the model's rotation differs from ours, if it does (un-rotated keys would be rotated wrongly)."""
    device = _device_of(rotary)
    pos = torch.tensor([[0, 1, 5, 100, 1000, 4095]], device=device)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32, device=device), pos)     # (1, P, D)
    if cos.shape[-1] != rope.head_dim:   # transformers 5 keeps partial_rotary_factor in rope_parameters
        return (f"it rotates {cos.shape[-1]} of the head's {rope.head_dim} dims (partial rotary); infinitehip "
                "rotates all")
    ours = rope.cos_sin(pos)                                                        # (1, P, D/2) each
    half = rope.head_dim // 2
    if all(torch.allclose(theirs[..., :half].float().cpu(), mine.cpu(), atol=1e-4)
           and torch.allclose(theirs[..., half:].float().cpu(), mine.cpu(), atol=1e-4)
           for theirs, mine in ((cos, ours[0]), (sin, ours[1]))):
        return None
    kind = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}.get("rope_type", "default")
    return f"it (rope type {kind!r}) differs from the RoPE infinitehip computes from the config"


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, infinitehip_attention)
    # SDPA's masks: None for an unpadded causal batch (nothing built), so a padded one is seen.
    AttentionMaskInterface.register(NAME, sdpa_mask)


_register()
