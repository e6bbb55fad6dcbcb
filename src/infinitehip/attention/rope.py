"""Rotary position embeddings (HF ``rotate_half`` convention) and the checkpoint's RoPE variants.

A rotation is fully described by ``inv_freq`` (D/2 frequencies) and a constant
``attention_scaling`` (YaRN's mscale), so attention kernels can rotate keys at whatever
positions adaptive RoPE assigns them. Only position *differences* matter to q·k, so callers
rotate at positions relative to a nearby base, which keeps fp32 angles exact at 3M tokens.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

SUPPORTED_SCALING = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True, eq=False)
class RoPE:
    inv_freq: torch.Tensor  # (D/2,) float32
    attention_scaling: float = 1.0

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def default(cls, head_dim: int, theta: float = 10000.0) -> "RoPE":
        if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim >= 2, got {head_dim!r}")
        # theta <= 0 gave inf / NaN frequencies, then NaN attention outputs, silently.
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not 0 < theta < math.inf:
            raise ValueError(f"RoPE theta={theta!r} must be a finite number > 0 (the checkpoint's rope_theta, "
                             "e.g. 10000.0 or 500000.0)")
        return cls(1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim).float())

    @classmethod
    def from_hf(cls, config: dict, head_dim: int) -> "RoPE":
        """The RoPE of an HF ``config.json`` (``rope_theta`` + ``rope_scaling``/``rope_parameters``)."""
        params = rope_parameters(config)
        theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        kind = params["rope_type"]
        if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported (Llama/Mistral/Qwen rotate every dim)")
        rope = cls.default(head_dim, theta)
        if kind == "default":
            return rope
        needs = {"linear": ("factor",), "yarn": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        missing = [key for key in needs.get(kind, ()) if key not in params]
        if missing:
            raise ValueError(f"rope type {kind!r} needs {', '.join(missing)} in config.json's rope_scaling / "
                             "rope_parameters; the checkpoint's config is incomplete")
        if kind == "linear":
            return cls(rope.inv_freq / float(params["factor"]))
        if kind == "llama3":
            return cls(_llama3_inv_freq(rope.inv_freq, params))
        if kind == "yarn":
            return _yarn(rope.inv_freq, params, config, head_dim, theta)
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_SCALING)}")

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, float32, shape ``positions.shape + (D/2,)``."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        s = self.attention_scaling
        return torch.cos(angles) * s, torch.sin(angles) * s


def rope_parameters(config: dict) -> dict:
    """An HF config's RoPE settings in one dict: transformers 5's ``rope_parameters`` updated by
    ``rope_scaling``, whose older key ``type`` counts as ``rope_type`` (as in transformers: a
    ``"type": "yarn"`` added to a transformers 5 config must not lose to its ``"rope_type": "default"``).
    ``rope_type`` is always set: "default" where neither names one."""
    scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling["type"])
    params = {**(config.get("rope_parameters") or {}), **scaling}
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., D) by cos/sin (..., D/2) broadcast over x; float32 math, x's dtype out."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_len = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen) - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def _yarn(inv_freq, p, config, head_dim, theta) -> RoPE:
    factor = float(p["factor"])
    old_len = float(p.get("original_max_position_embeddings") or config["max_position_embeddings"])
    # null means the default, as in transformers (float(None) was a TypeError)
    beta_fast = float(32 if p.get("beta_fast") is None else p["beta_fast"])
    beta_slow = float(1 if p.get("beta_slow") is None else p["beta_slow"])

    def get_mscale(m=1.0):
        return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

    mscale = p.get("attention_factor")
    if mscale is None:   # DeepSeek-style configs give mscale and mscale_all_dim: their ratio
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        mscale = get_mscale(m) / get_mscale(m_all) if m and m_all else get_mscale()

    def dim_of(rotations):  # the dim whose wavelength fits `rotations` times in old_len
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    extrapolation = 1 - ramp
    return RoPE(inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation, float(mscale))
