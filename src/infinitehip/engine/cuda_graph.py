"""The decode step captured in CUDA graphs, replayed each step.

Shapes are static (the cache is read at full capacity, each row's length is data), and no
backend syncs with the host. The cache is on the device, or offloaded: read in place (a
zero-copy device alias of host memory: the graph's kernels read and write it over PCIe) or
through its GPU page cache (bookkeeping as fixed-shape tensor ops on the device). ``hip``: one
graph per refresh stage; the per-layer masks live in static buffers that each replay updates in
place. A step that prunes from stage s replays graph (s,); steps that reuse the mask replay graph
(``n_stages``,). Rows at different refresh phases (a server's batch, whose requests joined at
different steps) replay graph ("rows", s) for the smallest stage s any row reruns, each row's own
stage a static device buffer (``api.RowStages``) refilled before the replay. ``dense`` (FlashAttention over each row's valid keys,
``models/llama.full_cache_decode``) and ``streaming`` (sink + window, a constant empty mask) keep
no state between steps: one graph serves every step.

With ``HiPConfig.refresh_lag`` the pruning leaves the step: a step that refreshes saves each
layer's query and its pruning runs on a side stream beside the next steps (``beside.py``);
``refresh_lag`` steps later the step waits for it and attends with what it pruned. Offloaded,
the pruning's probes over PCIe thus overlap the steps' compute instead of adding to them.
"""
from __future__ import annotations

import math

import torch

from ..attention import HiPMask
from ..attention.api import RowStages
from ..cache.kv import KVCache
from ..config import HiPConfig
from ..models.llama import BACKENDS, AttentionCall
from ..models.loader import Model
from .beside import BesidePruning
from .generate import decode_one_token
from .state import DecodeState


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
        # Rows at different refresh stages: each row's stage, filled in pinned memory (an async copy)
        self.row_stages = torch.zeros(B, dtype=torch.long, device=model.device)
        self._row_stages_host = torch.zeros(B, dtype=torch.long, pin_memory=True)
        self._copied = torch.cuda.Event()
        self.graphs: dict = {}
        self.pool = None
        self.masks: list[HiPMask | None] | None = None
        # refresh_lag: the deferred pruning runs on a side stream (beside.py)
        self.lag = model.hip.refresh_lag if state.backend == "hip" else 0
        self.beside = BesidePruning(model, cache, state, _capture) if self.lag else None

    def __call__(self, tokens: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        state, hip = self.state, self.model.hip
        if self.masks is None:  # the first step runs eagerly: it makes the masks the graphs update in place
            logits = decode_one_token(self.model, tokens, seqlens, self.cache, state)
            self.masks = [_clone(m) for m in state.masks]
            state.masks = self.masks
            if self.beside:
                self.beside.adopt(self.masks)
            return logits
        key = self._key()
        if key is None:  # with a refresh lag, rows at different phases: no graph for that mix
            return self._eager(tokens, seqlens)
        self.tokens.copy_(tokens)
        self.seqlens.copy_(seqlens)
        if key[0] == "rows":
            self._copied.synchronize()   # the host buffer's previous copy is done (it was, in practice)
            self._row_stages_host.copy_(torch.tensor(state.refresh_stages(hip)))
            self.row_stages.copy_(self._row_stages_host, non_blocking=True)
            self._copied.record()
        step = state.steps[0]
        if self.lag and key[1]:   # the masks pruned refresh_lag steps ago take effect
            self.beside.take_effect(hip.refreshes_upto(step - self.lag))
        if key not in self.graphs:
            self.graphs[key] = self._capture(key)
        graph, logits = self.graphs[key]
        graph.replay()
        if self.lag and key[0] < hip.n_stages:
            self.beside.prune(key[0], hip.refreshes_upto(step), self.seqlens)
        state.steps = [s + 1 for s in state.steps]
        return logits.clone()

    def _key(self) -> tuple | None:
        """The graph this step replays: hip's refresh stage (("rows", the smallest) when rows
        disagree), or with a lag (the stage it prunes from for later, whether masks take effect);
        None when rows disagree there. The other backends ignore the stage: one graph."""
        state, hip = self.state, self.model.hip
        if state.backend != "hip":
            return (0,)
        if not self.lag:
            stage = state.refresh_stages(hip)
            return (stage,) if isinstance(stage, int) else ("rows", min(stage))
        if state.refresh_stages(hip) != hip.n_stages:   # a row's first step prunes for itself
            return None
        later, now = state.deferred_stages(hip), state.taking_effect(hip)
        if not (isinstance(later, int) and isinstance(now, bool)):
            return None
        if (later < hip.n_stages or now) and len(set(state.steps)) > 1:
            return None   # the slots follow each row's own refresh count: the eager step files them per row
        return later, now

    def _eager(self, tokens: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        """One step without a graph; its masks land in the static buffers the graphs read."""
        state = self.state
        state.masks = list(self.masks)
        if self.beside:   # it reads and writes the slots of the pruning in flight
            self.beside.wait()
            state.pruned = [list(kept) for kept in self.beside.slots]
        logits = decode_one_token(self.model, tokens, seqlens, self.cache, state)
        _keep(self.masks, state.masks)
        state.masks = self.masks
        if self.beside:
            for static, new in zip(self.beside.slots, state.pruned):
                _keep(static, new)
            state.pruned = self.beside.slots
        return logits

    def _step(self, key: tuple) -> torch.Tensor:
        masks, hip = list(self.masks), self.model.hip
        stage = RowStages(key[1], self.row_stages) if key[0] == "rows" else key[0]
        call = AttentionCall(backend=self.state.backend, masks=masks, refresh_stage=stage, kernel=self.state.kernel)
        if self.lag:   # attend with the masks as they are; a refreshing step saves its queries
            later, now = key
            call.refresh_stage, call.pruned, call.defer_stage, call.fresh = hip.n_stages, list(masks), later, now
            call.queries = self.beside.queries if later < hip.n_stages else None
        logits = self.model.net(self.tokens[:, None], self.seqlens, self.cache, call)
        _keep(self.masks, masks)
        return logits[:, -1]

    def _capture(self, key: tuple):
        # Warm up on a side stream (this runs the step once; rerunning it is idempotent: same K/V
        # written at the same slots, the same mask recomputed from the same saved stage input).
        return _capture(lambda: self._step(key), self, "pool")


def warm_steps(hip: HiPConfig) -> int:
    """Decode steps after which every graph of ``hip``'s schedule has been captured (a benchmark's
    untimed steps): a refresh cycle, and with a lag every pairing of a stage with a slot."""
    if not hip.refresh_lag:
        return max(hip.refresh_intervals) + 1
    return math.lcm(*hip.refresh_intervals) * hip.pending_slots + hip.refresh_lag + 1


def _keep(static: list[HiPMask | None], new: list[HiPMask | None]):
    """Copy ``new`` masks into the ``static`` buffers a graph reads (where they differ)."""
    for s, n in zip(static, new):
        if s is not None and n is not None and n is not s:
            s.copy_(n)


def _capture(fn, owner, pool: str):
    """``fn()`` run once on a side stream (warm-up: compiles, makes cached constants), then
    captured into a CUDA graph sharing the memory pool ``owner.<pool>``. Returns (graph, output)."""
    here = torch.cuda.current_stream()
    warm = torch.cuda.Stream()
    warm.wait_stream(here)
    with torch.cuda.stream(warm):
        fn()
    here.wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=getattr(owner, pool)):
        out = fn()
    setattr(owner, pool, graph.pool())
    return graph, out
