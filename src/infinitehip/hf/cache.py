"""``HiPCache``: the transformers cache that makes the drop-in InfiniteHiP (``infinitehip.hf``).

Keys cached without RoPE in buffers that grow (no per-step copy of the cache), each layer's mask
kept for reuse, and the takeover of the model's rotation (``unrotate``) with its checks.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..attention import HiPMask, RoPE
from ..attention.rope import rope_parameters
from ..config import HiPConfig
from ..models.llama import trained_context

NAME = "infinitehip"   # the attn_implementation


@dataclass
class _LayerMask:
    mask: HiPMask | None   # what the layer's last decode step attended with (None: dense, or a prefill)
    step: int              # decode steps since that mask was pruned from scratch
    rows: int
    keys: int              # valid keys the call read


_pending = threading.local()   # the HiPCache update just made, for the attention call that follows it


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of (B, capacity, K, D) buffers that grow by
    half when full. DynamicLayer concatenates: every decode step copied the layer's whole cache
    (and attention copied the keys again into its (B, T, K, D) layout), O(T) bytes a step where
    the sparse attention reads a few thousand keys. Here a step writes its rows, and attention
    reads the buffer in place. A tensor transformers puts in place of the view (a beam
    reordering, a batch selection: copies) is taken over at the next update; a crop stays a view."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.get_seq_length(), key_states.shape[-2]
        viewed = self._viewed(n)
        if not viewed or n + t > self._k.shape[1]:
            self._regrow(key_states, value_states, n, n + t, full=viewed)
        self._k[:, n:n + t] = key_states.transpose(1, 2)
        self._v[:, n:n + t] = value_states.transpose(1, 2)
        self.keys, self.values = self._k[:, :n + t].transpose(1, 2), self._v[:, :n + t].transpose(1, 2)
        return self.keys, self.values

    def _viewed(self, n: int) -> bool:
        """Whether keys and values are still the first n rows of the buffers."""
        k = getattr(self, "_k", None)
        return (k is not None and n > 0 and self.keys.data_ptr() == k.data_ptr()
                and self.values.data_ptr() == self._v.data_ptr() and self.keys.shape[0] == k.shape[0]
                and self.keys.stride() == k.transpose(1, 2).stride())

    def _regrow(self, key_states, value_states, n: int, need: int, full: bool):
        """New buffers holding the first n keys and values with room for ``need``: grown by half when
        the viewed ones are full, else (the first call, keys that transformers replaced: a beam
        reordering every step) sized to need. Growing those by half too compounded: 20 steps of
        num_beams=2 made 920K rows for 79 keys."""
        capacity = -(-max(need, self._k.shape[1] * 3 // 2 if full else 0) // 256) * 256
        # Let go before the new ones are made: a replaced copy's old buffers are freed here (full
        # ones stay alive through the keys viewing them, for the copy below).
        self._k = self._v = None
        b, heads, _, d = (self.keys if n else key_states).shape
        self._k = key_states.new_empty(b, capacity, heads, d)
        self._v = value_states.new_empty(b, capacity, value_states.shape[1], value_states.shape[-1])
        if n:
            self._k[:, :n] = self.keys.transpose(1, 2)
            self._v[:, :n] = self.values.transpose(1, 2)

    def reset(self):
        # Dropped, as transformers 5.24's DynamicLayer does; 5.17's zeroed them in place and kept
        # their length, so the next prompt followed that many zero keys, attended silently.
        self._k = self._v = self.keys = self.values = None
        self.is_initialized = False
        super().reset()


class HiPCache(DynamicCache):
    """A transformers cache that lets the drop-in work as InfiniteHiP does in ``infinitehip.load``.

        cache = infinitehip.hf.HiPCache(model)
        model.generate(ids, past_key_values=cache, max_new_tokens=64)

    - Keys are cached **without RoPE**: making a HiPCache turns the model's rotary embedding into
      the identity while its attention implementation is "infinitehip" (once per model,
      ``unrotate``), and attention rotates queries and keys itself at adaptive positions (exact
      within the trained length, beyond it as the config's ``rope_*`` modes say), so the model
      reads past its trained context.
    - Each layer's **sparse mask is reused** across decode steps (one token a call), its stages
      rerun by the config's ``refresh_intervals``; beam reordering and batch selection move each
      row's mask with its keys; a prefill, a dense call or a crop prunes from scratch next.
    """

    def __init__(self, model: torch.nn.Module):
        unrotate(model)
        super().__init__(config=model.config)
        # Only the plain full-attention layers (unrotate refused sliding ones): a hybrid model's conv or
        # linear-attention layers (LFM2's) keep their own class, which holds their state.
        self.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if getattr(self, "layer_class_to_replicate", None) is not None:   # layers made lazily
            self.layer_class_to_replicate = _GrowingLayer
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


def cache_of(module: torch.nn.Module, key: torch.Tensor) -> HiPCache | None:
    """The HiPCache whose update returned ``key`` for this layer just now, if any."""
    pending, _pending.update = getattr(_pending, "update", None), None
    if pending is not None and pending[1] == getattr(module, "layer_idx", None) and pending[2] is key:
        return pending[0]
    return None


def unrotate(model: torch.nn.Module):
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
    attention = attention_modules(model)
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
        rope = _model_frequencies(RoPE.from_hf(cfg, head_dim), rotary)
        why = _differs(rotary, rope, cfg)
    except ValueError as e:   # a rope type infinitehip lacks (dynamic, longrope), partial rotary, ...
        why = str(e)
    if why:
        raise ValueError(f"HiPCache cannot take over this model's rotary embedding: {why}. Use the drop-in "
                         "without HiPCache (transformers rotates the keys, at exact positions)")
    return RoPE(rope.inv_freq.to(_device_of(rotary)), rope.attention_scaling)


def _model_frequencies(rope: RoPE, rotary: torch.nn.Module) -> RoPE:
    """``rope`` with the model's own float32 frequencies where they are the config's up to
    rounding: computed on a GPU they can be an ulp off ours (float32 pow there, float64 here),
    which at position 4K turns the angles 2e-4 apart; the model's are the rotation it was run with."""
    theirs = getattr(rotary, "inv_freq", None)
    if (isinstance(theirs, torch.Tensor) and theirs.dtype == torch.float32 and theirs.shape == rope.inv_freq.shape
            and torch.allclose(theirs.cpu(), rope.inv_freq.cpu(), rtol=1e-5, atol=0)):
        return RoPE(theirs.detach().clone(), rope.attention_scaling)
    return rope


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(iter(module.buffers()), torch.empty(0)).device


def _differs(rotary: torch.nn.Module, rope: RoPE, cfg: dict) -> str | None:
    """How the model's rotation differs from ours, if it does (un-rotated keys would be rotated wrongly)."""
    freqs = getattr(rotary, "inv_freq", None)
    if isinstance(freqs, torch.Tensor) and freqs.dtype != torch.float32:
        return (f"its frequencies (inv_freq) are {freqs.dtype}, not float32: a model cast with .to(dtype) casts them "
                "too; load it with from_pretrained(..., dtype=...), which keeps them float32, or cast "
                "rotary_emb.inv_freq back")
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
    return f"it (rope type {rope_parameters(cfg)['rope_type']!r}) differs from the RoPE infinitehip computes from the config"


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
    if not attention:
        raise ValueError("no attention modules with a layer_idx found in this model")
    return attention
