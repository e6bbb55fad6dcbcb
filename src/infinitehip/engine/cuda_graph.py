"""The decode step captured in CUDA graphs, replayed each step.

Shapes are static (the cache is read at full capacity, each row's length is data), and no
backend syncs with the host. The cache is on the device, or offloaded: read in place (a
zero-copy device alias of host memory: the graph's kernels read and write it over PCIe) or
through its GPU page cache (bookkeeping as fixed-shape tensor ops on the device). ``hip``: one
graph per refresh stage; the per-layer masks live in static buffers that each replay updates in
place. A step that prunes from stage s replays graph s; steps that reuse the mask replay graph
``n_stages``. ``dense`` (FlashAttention over each row's valid keys,
``models/llama.full_cache_decode``) and ``streaming`` (sink + window, a constant empty mask) keep
no state between steps: one graph serves every step.
"""
from __future__ import annotations

import torch

from ..attention import HiPMask
from ..cache.kv import KVCache
from ..models.llama import BACKENDS, AttentionCall
from ..models.loader import Model
from .generate import DecodeState, decode_one_token


def _clone(mask: HiPMask | None) -> HiPMask | None:
    if mask is None:
        return None
    return mask.clone()


class GraphDecoder:
    """Drop-in for ``decode_one_token`` on CUDA: ``decoder(tokens (B,), seqlens (B,)) -> (B, V)``."""

    def __init__(self, model: Model, cache: KVCache, state: DecodeState):
        if model.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; the model is on {model.device}")
        if state.backend not in BACKENDS:
            raise ValueError(f"backend={state.backend!r}; choose one of {BACKENDS}")
        B = cache.batch
        self.model, self.cache, self.state = model, cache, state
        self.tokens = torch.zeros(B, dtype=torch.long, device=model.device)
        self.seqlens = torch.zeros(B, dtype=torch.long, device=model.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.masks: list[HiPMask | None] | None = None

    def __call__(self, tokens: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        state = self.state
        if self.masks is None:  # the first step runs eagerly: it makes the masks the graphs update in place
            logits = decode_one_token(self.model, tokens, seqlens, self.cache, state)
            self.masks = [_clone(m) for m in state.masks]
            state.masks = self.masks
            return logits
        stage = self._stage()
        if not isinstance(stage, int):  # rows at different refresh phases: no graph for that mix
            return self._eager(tokens, seqlens)
        self.tokens.copy_(tokens)
        self.seqlens.copy_(seqlens)
        if stage not in self.graphs:
            self.graphs[stage] = self._capture(stage)
        graph, logits = self.graphs[stage]
        graph.replay()
        state.steps = [s + 1 for s in state.steps]
        return logits.clone()

    def _stage(self) -> int | list[int]:
        """The graph this step replays: hip's refresh stage (per row when rows disagree); the
        other backends ignore the stage, so they share graph 0."""
        return self.state.refresh_stages(self.model.hip) if self.state.backend == "hip" else 0

    def _eager(self, tokens: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        """One step without a graph; its masks land in the static buffers the graphs read."""
        state = self.state
        state.masks = list(self.masks)
        logits = decode_one_token(self.model, tokens, seqlens, self.cache, state)
        self._keep(state.masks)
        state.masks = self.masks
        return logits

    def _keep(self, masks: list[HiPMask | None]):
        for static, new in zip(self.masks, masks):
            if static is not None and new is not None and new is not static:
                static.copy_(new)

    def _step(self, stage: int) -> torch.Tensor:
        masks = list(self.masks)
        call = AttentionCall(backend=self.state.backend, masks=masks, refresh_stage=stage, kernel=self.state.kernel)
        logits = self.model.net(self.tokens[:, None], self.seqlens, self.cache, call)
        self._keep(masks)
        return logits[:, -1]

    def _capture(self, stage: int):
        # Warm up on a side stream (this runs the step once; rerunning it is idempotent: same K/V
        # written at the same slots, the same mask recomputed from the same saved stage input).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(stage)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(stage)
        self.pool = graph.pool()
        return graph, logits
