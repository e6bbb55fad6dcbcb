"""One lean decoder for Llama, Mistral, Qwen2 and Qwen3 (they differ only by config flags).

Attention goes through ``attention/api.py`` only: ``hip`` (InfiniteHiP, default), ``dense``
(exact SDPA) or ``streaming`` (sink + sliding window, StreamingLLM). Keys are cached
un-rotated; the attention call rotates them at the positions adaptive RoPE picks.
Legend: B batch, T tokens, H query heads, K kv heads, D head dim, C hidden size.

Decode is launch-bound (one token: every kernel is small), so a layer issues few kernels: on
CUDA each linear layer is one Triton GEMV with its RMSNorm or SiLU * up applied to its input and
the residual add to its output (``gemv.py``), q/k/v in one weight and gate/up in another; RoPE
tables built once per pass (not per layer) and applied to q and k together.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import HiPMask, RoPE, dense_attention, empty_mask
from ..attention.rope import rope_parameters
from ..attention.stages import n_groups
from ..config import HiPConfig
from . import gemv

BACKENDS = ("hip", "dense", "streaming")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# config.json's model_type -> architecture, for a config without "architectures" (transformers goes by model_type)
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


def trained_context(cfg: dict) -> int | None:
    """The context an HF ``config.json`` was trained on: a rope-scaled model's original length
    (``original_max_position_embeddings``), else ``max_position_embeddings``; None if neither."""
    rope = rope_parameters(cfg)
    scaled = rope["rope_type"] != "default"
    original = int(rope.get("original_max_position_embeddings") or 0) if scaled else 0
    return original or int(cfg.get("max_position_embeddings") or 0) or None


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
        if cfg.get("architectures"):
            arch, named = cfg["architectures"][0], f"architecture {cfg['architectures'][0]!r}"
        else:
            arch = MODEL_TYPES.get(cfg.get("model_type"))
            named = f"model_type {cfg.get('model_type')!r} (config.json names no architectures)"
        if arch not in ARCHITECTURES:
            raise ValueError(f"{named} is not supported; supported: {', '.join(ARCHITECTURES)}")
        quantized = cfg.get("quantization_config")
        if quantized:   # its weights are packed integers or fp8 with scale tensors, not what this decoder loads
            method = quantized.get("quant_method") if isinstance(quantized, dict) else None
            raise ValueError(f"config.json describes a quantized checkpoint (quant_method {method!r}): quantized "
                             "weights are not supported; use the unquantized (bfloat16/float16) checkpoint")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):   # transformers' "swish" is SiLU too
            raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}: not a complete {arch} config; re-download it")
        window = cfg.get("sliding_window") if arch == "MistralForCausalLM" or cfg.get("use_sliding_window") else None
        if window:   # every layer of the original attends only its last `window` keys; this decoder, more
            warnings.warn(f"{arch} with sliding_window={window}: the checkpoint's layers attend only their "
                          f"last {window} keys, infinitehip's attend further (dense: all; hip: sink, window and "
                          f"selected chunks), so past {window} tokens answers differ from transformers'", stacklevel=2)
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        attn_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"], n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
            trained_context=trained_context(cfg) or 0,
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
    # HiPConfig.refresh_lag > 0: pruning for later. ``masks`` are attended with; ``pruned`` (per
    # layer) is, going in, the mask each row's deferred pruning starts from (its newest pruned)
    # and, coming out, what this step pruned, which ``DecodeState.keep_pruned`` files in its slot.
    pruned: list[HiPMask | None] | None = None
    defer_stage: int | list[int] | None = None    # per row: first stage to prune for later (n_stages: none)
    fresh: bool = False                           # masks took effect this step: a paged cache fetches
    queries: list[torch.Tensor] | None = None     # CUDA graphs: save q per layer, pruned on a side stream
    # hip: attend sparsely whatever the pass's key count (still dense within sink + window). Chunked
    # prefill of a prompt longer than the dense cutoff sets it, so that its chunks attend as one call
    # over the whole prompt would (engine.prefill).
    sparse: bool = False


@dataclass
class Step:
    """What every layer of one forward pass shares: made once per pass, not once per layer."""

    start: torch.Tensor                   # (B,) int64, tokens already cached per row
    kv_len: torch.Tensor                  # (B,) keys per row once this pass is written (start + T)
    rope: RoPE                            # the model's (hip and streaming rotate inside attention)
    kv_limit: int | None = None           # read only the first kv_limit cache slots (None: all)
    write: object = None                  # the cache's plan_write(start, T): where every layer writes
    rot: tuple[torch.Tensor, torch.Tensor] | None = None   # dense: RoPE cos, signed sin (B, T, 1, D) fp32
    flash: tuple[torch.Tensor, ...] | None = None          # dense full-capacity decode: cu_q, cu_k, seqused_k


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's math (fp32), except that in half precision the result is rounded once (after the
        # weight) instead of twice. On CUDA one Triton launch: F.rms_norm's kernel took 6.3 us.
        if x.is_cuda:
            from .fused import rms_norm_triton
            return rms_norm_triton(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    @property
    def args(self) -> tuple[torch.Tensor, float]:
        """(g, eps), for a linear layer that applies this norm to its input (``gemv.linear``)."""
        return self.weight, self.eps


def rotate(x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE (HF rotate_half convention) of x (B, T, heads, D) with ``Step.rot``; fp32 math, x's dtype out.

    x * cos + rotate_half(x) * sin, where rotate_half(x) * sin == roll(x, D/2) * (-sin, sin):
    five kernels in half precision (``attention.rope.apply_rope``'s cat form takes nine).
    """
    cos, sin = rot
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, -1), sin).to(x.dtype)


def full_cache_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, scale: float) -> torch.Tensor:
    """Dense attention of one query per row over the cache read at full capacity: static shapes
    and no host syncs, so a CUDA graph can capture it (each row's length is data, not a shape).

    q (B, 1, H, D), k (B, capacity, K, D), both rotated; v (B, capacity, K, D) -> (B, 1, H, D).
    Eager decode instead slices the cache to the valid keys, a shape that changes every step.
    On CUDA in half precision: FlashAttention's varlen entry with ``seqused_k`` (device-side
    lengths): it reads only each row's valid keys and splits them over the SMs (split-KV, GQA
    heads packed as query rows), the kernels eager decode gets from SDPA. Not SDPA over the
    capacity with a mask: flash takes no mask, the kernels that do read the whole capacity, and
    with GQA SDPA may take its math path, which expands K/V per query head. That masked form is
    the exact fallback elsewhere (CPU, fp32, no flash, a cache that is not one dense tensor).
    """
    if step.flash is None or k.device != q.device or not (k.is_contiguous() and v.is_contiguous()):
        return dense_attention(q, k, v, step.kv_len, None, scale)     # unwritten tail masked
    B, cap, K, D = k.shape
    cu_q, cu_k, used = step.flash
    out = torch.ops.aten._flash_attention_forward(
        q[:, 0], k.view(B * cap, K, D), v.view(B * cap, K, D), cu_q, cu_k, 1, cap, 0.0, False, False,
        scale=scale, seqused_k=used)[0]                                  # (B, H, D)
    return out[:, None]


@functools.lru_cache(maxsize=None)
def _flash_ok(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FlashAttention (sm80+, fp16/bf16, D % 8 == 0, D <= 256) runs here."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 256:
        return False
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) >= (8, 0)


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

    def forward(self, x, norm: RMSNorm, step: Step, cache, hip: HiPConfig, call: AttentionCall):
        """x + attention(norm(x)): x (B, T, C) the residual stream, updated in place."""
        B, T, _ = x.shape
        H, K, D = self.args.n_heads, self.args.n_kv_heads, self.args.head_dim
        # K and V go to the cache as projected (no q/k norm, no rotation: hip caches un-rotated
        # keys): the projection writes them there itself, in its epilogue on CUDA.
        target = cache.write_target(self.layer, step.write) if self.q_norm is None and step.rot is None else None
        scatter = gemv.Scatter(*target, col=H * D) if target is not None else None
        qkv = gemv.linear(x, self.wqkv.weight, self.wqkv.bias, norm=norm.args, scatter=scatter)
        qkv = qkv.view(B, T, H + 2 * K, D)
        qk, v = qkv[:, :, :H + K], qkv[:, :, H + K:]                             # (B, T, H + K, D), (B, T, K, D)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        if step.rot is not None:  # dense: q and k rotated together; keys cached at their true positions
            qk = rotate(qk, step.rot)
        q, k = qk[:, :, :H], qk[:, :, H:]
        if scatter is None:
            k_all, v_all = cache.update(self.layer, step.start, k, v, plan=step.write)   # (B, capacity, K, D)
        else:
            k_all, v_all = cache.views(self.layer)
        if call.backend == "dense":
            out = self._dense(q, k_all, v_all, step)
        else:
            out = self._sparse(q, k_all, v_all, step, cache, hip, call)
        return gemv.linear(out.reshape(B, T, H * D), self.wo.weight, self.wo.bias, residual=x)   # (B, T, C)

    def _dense(self, q, k_all, v_all, step: Step):
        if step.kv_limit is None and q.shape[1] == 1:
            return full_cache_decode(q, k_all, v_all, step, self.scale)
        if step.kv_limit is not None:
            k_all, v_all = k_all[:, :step.kv_limit], v_all[:, :step.kv_limit]
        full = step.kv_limit is not None and q.shape[0] == 1      # the one row has exactly kv_limit keys
        return dense_attention(q, k_all, v_all, None if full else step.kv_len, None, self.scale)

    def _sparse(self, q, k_all, v_all, step: Step, cache, hip: HiPConfig, call: AttentionCall):
        if step.kv_limit is not None:
            k_all, v_all = k_all[:, :step.kv_limit], v_all[:, :step.kv_limit]
        mask, stage = None, 0
        if call.backend == "streaming":
            B, T = q.shape[:2]
            nqb = -(-T // hip.block_size_q)
            mask, stage = empty_mask(hip, B, n_groups(hip, self.args.n_kv_heads), nqb, q.device), hip.n_stages
        elif call.masks is not None and call.masks[self.layer] is not None:
            mask, stage = call.masks[self.layer], call.refresh_stage
        # The cache supplies the attention call: hip_attention, or the offloaded cache's own
        # (it reads host memory, maybe through a GPU page cache).
        out, mask = cache.attention(self.layer)(q, k_all, v_all, config=hip, rope=step.rope, scale=self.scale,
                                                cache_seqlens=step.kv_len, mask=mask, refresh_stage=stage,
                                                backend=call.kernel, fresh=call.fresh)
        if call.masks is not None and call.backend == "hip":
            call.masks[self.layer] = mask
            if call.pruned is not None:
                self._prune_for_later(q, k_all.shape[1], step, cache, hip, call)
        return out

    def _prune_for_later(self, q, tk: int, step: Step, cache, hip: HiPConfig, call: AttentionCall):
        """refresh_lag > 0: ``call.pruned`` holds the mask each row's deferred pruning starts from
        (the newest it pruned); rows that pruned now (a first step) start again from what they
        attended with. Rows with a deferred refresh prune from it for a later step, which
        ``DecodeState.keep_pruned`` files (in a CUDA graph they leave q for the side stream)."""
        chain, live = call.pruned[self.layer], call.masks[self.layer]
        now = call.refresh_stage
        if chain is None or live is None or now == 0:
            chain = live
        elif not isinstance(now, int):
            chain = chain.where(torch.tensor([s < hip.n_stages for s in now], device=q.device), live)
        call.pruned[self.layer] = chain
        later = call.defer_stage
        if later is None or later == hip.n_stages:
            return
        if call.queries is not None:
            call.queries[self.layer].copy_(q)
            return
        call.pruned[self.layer] = self.prune(q, tk, step.kv_len, step.rope, cache, hip, chain, later, call.kernel)

    def prune(self, q, tk: int, kv_len, rope: RoPE, cache, hip: HiPConfig, mask: HiPMask | None, stage, kernel: str,
              programs: int | None = None):
        """The mask this layer's attention would prune from ``stage`` (an int or one per row) for
        the queries ``q`` (B, 1, H, D), without attending; None while attention is dense.
        programs: cap on the scoring launches' programs (pruning beside decode)."""
        return cache.prune(self.layer)(q, tk, config=hip, rope=rope, cache_seqlens=kv_len, mask=mask,
                                       refresh_stage=stage, backend=kernel, programs=programs)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)  # gate, up fused
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x, norm: RMSNorm):
        """x + ffn(norm(x)): x (B, T, C) the residual stream, updated in place."""
        gate_up = gemv.linear(x, self.w13.weight, self.w13.bias, norm=norm.args)        # (B, T, 2 I)
        return gemv.linear(gate_up, self.w2.weight, self.w2.bias, silu=True, residual=x)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, step: Step, cache, hip: HiPConfig, call: AttentionCall):
        x = self.attention(x, self.attention_norm, step, cache, hip, call)
        return self.feed_forward(x, self.ffn_norm)


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
        # No dense fallback below the crossover (still dense within sink + window, where sparse
        # attention would attend every key): the streaming baseline, and prompts past the cutoff.
        self.sparse_configs = [c.replace(dense_threshold=0) for c in self.layer_configs]

    def configs(self, call: AttentionCall) -> list[HiPConfig]:
        """Each layer's HiP config for a pass attending as ``call`` says."""
        return self.sparse_configs if call.backend == "streaming" or call.sparse else self.layer_configs

    @property
    def dense_cutoff(self) -> int:
        """hip attends densely in a pass of at most this many keys (``HiPConfig.dense_cutoff``)."""
        return max(cfg.dense_cutoff for cfg in self.layer_configs)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: torch.Tensor, cache, call: AttentionCall | None = None,
                kv_limit: int | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits of ``tokens`` (B, T) placed at positions ``start[b] + t``; writes their K/V to ``cache``.

        start: (B,) int64, tokens already in the cache per row. kv_limit: read only the first
        ``kv_limit`` cache slots (>= max(start) + T; None reads the full capacity: static shapes).
        One row's dense attention takes all kv_limit keys unmasked (``Attention._dense``): start + T.
        Returns (B, T, vocab) float logits, or (B, 1, vocab) with ``last_only``.
        """
        call = call or AttentionCall()
        if call.backend not in BACKENDS:
            raise ValueError(f"backend={call.backend!r}; choose one of {BACKENDS}")
        step = self.step(tokens.shape[1], start, cache, call.backend, kv_limit)
        x = self.tok_embeddings(tokens)                                         # (B, T, C)
        configs = self.configs(call)
        for layer, block in enumerate(self.layers):
            x = block(x, step, cache, configs[layer], call)
        if last_only:
            x = x[:, -1:]
        return gemv.linear(x, self.output.weight, norm=self.norm.args).float()

    def step(self, T: int, start: torch.Tensor, cache, backend: str, kv_limit: int | None) -> Step:
        """The per-pass state every layer reads (a handful of small kernels, once per pass)."""
        step = Step(start, start + T, self.rope, kv_limit, cache.plan_write(start, T))
        if backend != "dense":  # hip and streaming rotate inside the attention call
            return step
        pos = start[:, None] + torch.arange(T, device=start.device)              # (B, T)
        cos, sin = self.rope.cos_sin(pos)                                       # (B, T, D/2) fp32
        step.rot = (torch.cat([cos, cos], -1)[:, :, None], torch.cat([-sin, sin], -1)[:, :, None])
        weight = self.tok_embeddings.weight
        if T == 1 and kv_limit is None and _flash_ok(weight.device, weight.dtype, self.args.head_dim):
            cu_q = torch.arange(start.shape[0] + 1, device=start.device, dtype=torch.int32)  # one query per row
            step.flash = (cu_q, cu_q * cache.capacity, step.kv_len.to(torch.int32))   # row b's keys at b * capacity
        return step
