"""One lean decoder for Llama, Mistral, Qwen2 and Qwen3 (they differ only by config flags).

Attention goes through ``attention/api.py`` only: ``hip`` (InfiniteHiP, default), ``dense``
(exact SDPA) or ``streaming`` (sink + sliding window, StreamingLLM). Keys are cached
un-rotated; the attention call rotates them at the positions adaptive RoPE picks.
Legend: B batch, T tokens, H query heads, K kv heads, D head dim, C hidden size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import HiPMask, RoPE, dense_attention, empty_mask
from ..attention.rope import apply_rope
from ..attention.stages import n_groups
from ..config import HiPConfig

BACKENDS = ("hip", "dense", "streaming")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    trained_context: int          # the context the model was trained on (pre rope-scaling)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False         # Qwen3: RMSNorm over each head's q and k before RoPE
    tie_embeddings: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        """Read an HF ``config.json`` dict; raises ValueError for what this decoder can't run."""
        arch = (cfg.get("architectures") or [None])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        attn_bias = bool(cfg.get("attention_bias", False))
        rope = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}
        max_pos = int(cfg.get("max_position_embeddings", 0)) or None
        scaled = rope.get("rope_type", rope.get("type", "default")) != "default"
        trained = int(rope.get("original_max_position_embeddings") or 0) if scaled else 0
        return cls(
            architecture=arch, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"], n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos or 0, trained_context=trained or max_pos or 0,
            qkv_bias=True if arch == "Qwen2ForCausalLM" else attn_bias,
            o_bias=False if arch == "Qwen2ForCausalLM" else attn_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=arch == "Qwen3ForCausalLM",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache elements per token (all layers, K and V); multiply by the element size."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim

    def n_params(self) -> int:
        attn = self.dim * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim + self.n_heads * self.head_dim * self.dim
        mlp = 3 * self.dim * self.intermediate_size
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + emb + self.dim


@dataclass
class AttentionCall:
    """How one forward pass attends: the backend and, in decode, the per-layer mask state."""

    backend: str = "hip"
    masks: list[HiPMask | None] | None = None     # per layer; reused when refresh_stage > 0
    refresh_stage: int | list[int] = 0            # per row when rows decode at different steps
    kernel: str = "auto"                          # hip_attention's backend: auto | triton | reference


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.args = layer, args
        H, K, D = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (H + 2 * K) * D, bias=args.qkv_bias)   # q, k, v fused
        self.wo = nn.Linear(H * D, args.dim, bias=args.o_bias)
        self.q_norm = RMSNorm(D, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(D, args.norm_eps) if args.qk_norm else None
        self.scale = 1.0 / math.sqrt(D)

    def forward(self, x, start, cache, rope: RoPE, hip: HiPConfig, call: AttentionCall, kv_limit: int | None):
        B, T, _ = x.shape
        H, K, D = self.args.n_heads, self.args.n_kv_heads, self.args.head_dim
        q, k, v = self.wqkv(x).split([H * D, K * D, K * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if call.backend == "dense":  # a dense engine caches keys rotated at their true positions
            cos, sin = rope.cos_sin(start[:, None] + torch.arange(T, device=x.device))     # (B, T, D/2)
            k = apply_rope(k, cos[:, :, None], sin[:, :, None])
        k_all, v_all = cache.update(self.layer, start, k, v)                    # (B, capacity, K, D)
        if kv_limit is not None:
            k_all, v_all = k_all[:, :kv_limit], v_all[:, :kv_limit]
        kv_len = start + T                                                      # (B,)
        if call.backend == "dense":
            full = kv_limit is not None and B == 1          # the one row has exactly kv_limit keys
            out = dense_attention(q, k_all, v_all, None if full else kv_len, rope, self.scale, keys_rotated=True)
        else:
            mask, stage = None, 0
            if call.backend == "streaming":
                nqb = -(-T // hip.block_size_q)
                mask, stage = empty_mask(hip, B, n_groups(hip, K), nqb, x.device), hip.n_stages
            elif call.masks is not None and call.masks[self.layer] is not None:
                mask, stage = call.masks[self.layer], call.refresh_stage
            # The cache supplies the attention call: hip_attention, or the offloaded cache's own
            # (it reads host memory and a GPU block cache).
            out, mask = cache.attention(self.layer)(q, k_all, v_all, config=hip, rope=rope, scale=self.scale,
                               cache_seqlens=kv_len, mask=mask, refresh_stage=stage, backend=call.kernel)
            if call.masks is not None and call.backend == "hip":
                call.masks[self.layer] = mask
        return self.wo(out.reshape(B, T, H * D))                                # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)  # gate, up fused
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, start, cache, rope, hip, call, kv_limit):
        x = x + self.attention(self.attention_norm(x), start, cache, rope, hip, call, kv_limit)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, rope: RoPE, hip: HiPConfig):
        super().__init__()
        self.args, self.rope = args, rope
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.set_hip_config(hip)

    def set_hip_config(self, hip: HiPConfig):
        """The HiP config, resolved per layer (dense layers get a larger budget)."""
        self.hip = hip
        self.layer_configs = [hip.for_layer(i, self.args.n_layers) for i in range(self.args.n_layers)]
        # The streaming baseline is sink + window at every length: no dense fallback below the crossover.
        self.streaming_configs = [c.replace(dense_threshold=0) for c in self.layer_configs]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: torch.Tensor, cache, call: AttentionCall | None = None,
                kv_limit: int | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits of ``tokens`` (B, T) placed at positions ``start[b] + t``; writes their K/V to ``cache``.

        start: (B,) int64, tokens already in the cache per row. kv_limit: read only the first
        ``kv_limit`` cache slots (>= max(start) + T; None reads the full capacity: static shapes).
        Returns (B, T, vocab) float logits, or (B, 1, vocab) with ``last_only``.
        """
        call = call or AttentionCall()
        if call.backend not in BACKENDS:
            raise ValueError(f"backend={call.backend!r}; choose one of {BACKENDS}")
        x = self.tok_embeddings(tokens)                                         # (B, T, C)
        configs = self.streaming_configs if call.backend == "streaming" else self.layer_configs
        for layer, block in enumerate(self.layers):
            x = block(x, start, cache, self.rope, configs[layer], call, kv_limit)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()
