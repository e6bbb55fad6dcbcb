"""Pruning beside decode (``HiPConfig.refresh_lag``, CUDA graphs): the deferred refreshes run on a
side stream while the next decode steps replay on the main one.

A step that refreshes (its graph saves each layer's query) hands its pruning over: the queries and
the step's key counts are stashed in the slot of that refresh's mask (``DecodeState.pruned``'s
layout: refresh j in slot j % ``pending_slots``), and a graph of the pruning alone, from stage s
into slot r, starting from the mask of slot r - 1, is replayed on the side stream. ``refresh_lag``
steps later the main stream waits for that pruning (its event) and replays a graph copying slot r
into the masks it attends with. ``pending_slots`` is how many refreshes can be in flight plus the
newest in use, so a slot is refilled only after the main stream has waited for what it held.

The side stream's graphs have their own memory pool (they run beside the main ones), and their
scoring launches use at most ``programs`` programs: a scoring program holds half an SM's registers
while its probes wait on PCIe or memory, so an uncapped grid fills the SMs and decode's GEMVs wait
for room (H200, 1M tokens offloaded, ``bench offload --refresh-lag 8``: uncapped 126.8 tokens/s,
the same as without the lag; half the SMs 145.2).
"""
from __future__ import annotations

import torch

from ..attention import HiPMask


class BesidePruning:
    """The side stream of a ``GraphDecoder`` whose model has a refresh lag; ``capture(fn, owner,
    pool)`` is its graph capture."""

    def __init__(self, model, cache, state, capture):
        self.model, self.cache, self.state, self.capture = model, cache, state, capture
        hip, B, dev = model.hip, cache.batch, model.device
        self.n_slots = hip.pending_slots
        self.stream = torch.cuda.Stream(device=dev)
        self.programs = max(1, torch.cuda.get_device_properties(dev).multi_processor_count // 2)
        shape = (B, 1, model.args.n_heads, model.args.head_dim)
        self.queries = [torch.empty(shape, dtype=model.dtype, device=dev) for _ in range(model.args.n_layers)]
        self.stash = [[torch.empty_like(q) for q in self.queries] for _ in range(self.n_slots)]
        self.lens = [torch.zeros(B, dtype=torch.long, device=dev) for _ in range(self.n_slots)]
        self.slots: list[list[HiPMask | None]] | None = None     # per layer, per slot: static masks
        self.masks: list[HiPMask | None] | None = None           # the graphs' masks, attended with
        self.prune_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.take_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None         # the side stream's graphs
        self.take_pool = None
        self.events: dict[int, torch.cuda.Event] = {}           # refresh index -> its pruning done

    def adopt(self, masks: list[HiPMask | None]):
        """After the first (eager) step: static buffers for every slot, each the step's mask."""
        kept = self.state.pruned
        self.slots = [[None if k[0] is None else k[0].clone() for _ in range(self.n_slots)] for k in kept]
        self.state.pruned = self.slots
        self.masks = masks

    def take_effect(self, j: int):
        """Main stream: wait for refresh ``j``'s pruning, then copy its masks into those attended."""
        self.wait(j)
        r = j % self.n_slots
        if r not in self.take_graphs:
            self.take_graphs[r] = self.capture(lambda: self._take(r), self, "take_pool")[0]
        self.take_graphs[r].replay()

    def prune(self, stage: int, j: int, seqlens: torch.Tensor):
        """After the graph of refresh ``j``'s step: stash its queries and lengths, then its pruning
        from ``stage`` on the side stream."""
        r = j % self.n_slots
        torch._foreach_copy_(self.stash[r], self.queries)
        self.lens[r].copy_(seqlens + 1)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if (stage, r) not in self.prune_graphs:
                # Rerunning is idempotent: the pruning reads slot r - 1 and writes slot r.
                self.prune_graphs[stage, r] = self.capture(lambda: self._prune(stage, r), self, "pool")[0]
            self.prune_graphs[stage, r].replay()
            self.events[j] = torch.cuda.Event()
            self.events[j].record(self.stream)

    def wait(self, j: int | None = None):
        """Main stream: wait for refresh ``j``'s pruning (None: every one in flight)."""
        for i in sorted(self.events) if j is None else [j]:
            event = self.events.pop(i, None)
            if event is not None:
                torch.cuda.current_stream().wait_event(event)

    def _take(self, r: int):
        for mask, kept in zip(self.masks, self.slots):
            if mask is not None and kept[r] is not None:
                mask.copy_(kept[r])

    def _prune(self, stage: int, r: int):
        net, last = self.model.net, (r - 1) % self.n_slots
        for i, block in enumerate(net.layers):
            kept = self.slots[i]
            if kept[r] is None:   # the layer attends densely (a short context): nothing to prune
                continue
            new = block.attention.prune(self.stash[r][i], self.cache.capacity, self.lens[r], net.rope, self.cache,
                                        net.layer_configs[i], kept[last], stage, self.state.kernel,
                                        programs=self.programs)
            if new is not None:
                kept[r].copy_(new)
