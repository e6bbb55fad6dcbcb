"""Continuous batching: requests come and go while one batched decode step serves them all.

``BatchRunner`` owns a KV cache of ``max_batch`` rows (slots) of ``max_context`` tokens each,
planned and allocated once. ``add`` queues a request; every ``step``:

1. **prefill**: admits waiting requests into free slots and prefills them in arrival order, one
   ``chunk_size`` chunk at a time, while the step's ``prefill_budget`` of prompt tokens lasts (the
   chunk that crosses it runs whole). A long document is thus prefilled a chunk per step *between*
   decode steps, so running requests keep streaming (each step adds at most a budget and a chunk of
   prefill to their latency) and the prompt is still cut at the same chunk boundaries as a prefill
   of its own (identical KV). Into an offloaded cache a long prompt goes layer by layer, a chunk's
   worth of (layer, chunk) units a step (``layer_prefill.LayerPrefill``): chunk by chunk, each
   chunk would read the layer's keys so far over PCIe, quadratic in the prompt.
   With a ``PrefixCache``, a prefix that a slot still holds from an earlier request (a shared
   document; ``slot_prompts.py``) or that the cache holds is reused instead of prefilled.
2. **decode**: one forward pass for every slot, each row at its own position; each request
   samples from its own row with its own ``SamplingParams`` and ``torch.Generator``. With
   ``cuda_graph`` (GPU) the pass is replayed from CUDA graphs, rows at different refresh phases
   included (``GraphDecoder``: the graph of the smallest stage any row reruns, each row's stage
   a device buffer); it reads every slot at full capacity, where an eager step reads the keys
   up to the longest row.

A finished, stopped or cancelled request frees its slot at once for the next one.

Isolation (a request's tokens do not depend on its neighbours): rows never read each other's
keys; sampling is per row; with the ``hip`` backend each row refreshes its sparse mask on its
own step count (``DecodeState.admit``), and decode always reads enough keys that attention
takes the sparse path for every row (see ``_sparse_floor``), so a short row does not switch to
dense attention only when it happens to be alone. Slots that are free or still prefilling
ride along in the decode step parked at a position nothing reads yet (their output is discarded).

Legend: B batch (= max_batch), T tokens, V vocabulary.
"""
from __future__ import annotations

import operator
import time
from collections import deque

import torch

from ..cache.kv import CapacityError, KVCache
from ..cache.offload_kv import OffloadKVCache
from ..cache.offload_plan import OffloadConfig
from ..config import is_int
from ..models import AttentionCall
from ..models.llama import BACKENDS
from . import layer_prefill
from .cuda_graph import GraphDecoder
from .generate import decode_one_token, make_cache, prefill, sparse_prompt
from .state import DecodeState
from .prefix_cache import PrefixCache, fingerprint, stores_fp8
from .requests import BatchEvent, BatchStats, Request, check_token_ids
from .sampling import SamplingParams, TextOutput, sample
from .slot_prompts import SlotPrompts


class BatchRunner:
    """Continuous batching over ``max_batch`` KV-cache slots of ``max_context`` tokens each.

    Not thread-safe: one thread (a server's worker) calls ``add``, ``step``, ``cancel``.
    cuda_graph: replay decode steps from CUDA graphs (CUDA only); None: where that path is tested on
    a GPU -- CUDA, no refresh lag (slots on the GPU or offloaded).
    """

    def __init__(self, model, *, max_batch: int = 8, max_context: int = 4096, backend: str = "hip",
                 chunk_size: int = 4096, prefill_budget: int | None = None, kernel: str = "auto",
                 prefix_cache: PrefixCache | None = None, offload: bool | OffloadConfig | None = False,
                 cuda_graph: bool | None = False):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
        # Integers: a float chunk_size failed every step in prefill (each failure aborting the requests
        # holding slots), and a prefill_budget < 1 never prefilled anything (has_work forever).
        sizes = (max_batch, max_context, chunk_size, chunk_size if prefill_budget is None else prefill_budget)
        if not all(is_int(x) for x in sizes) or max_batch < 1 or max_context < 2 or chunk_size < 1 or sizes[3] < 1:
            raise ValueError(f"need integers max_batch >= 1, max_context >= 2, chunk_size >= 1 and prefill_budget "
                             f">= 1 (or None: chunk_size); got {max_batch!r}, {max_context!r}, {chunk_size!r}, "
                             f"{prefill_budget!r}")
        # Graphs whose pruning runs beside decode (refresh_lag) are per step of one phase: not built here.
        lagged = backend == "hip" and model.hip.refresh_lag > 0
        if cuda_graph and lagged:
            raise ValueError("cuda_graph with HiPConfig.refresh_lag is not supported by the batch runner: use "
                             "refresh_lag=0 or cuda_graph=False")
        self.model, self.backend, self.kernel = model, backend, kernel
        self.max_batch, self.max_context, self.chunk_size = max_batch, max_context, chunk_size
        self.prefill_budget = sizes[3]
        self.prefix_cache = prefix_cache
        self.cache = self._allocate(offload)
        # The prefix cache's entries this runner may reuse (it may be shared): those its model,
        # backend and K/V storage wrote.
        self.owner = fingerprint(model, backend, stores_fp8(self.cache)) if prefix_cache is not None else ""
        # Prompts kept in their slots for reuse (on the device, or offloaded in host memory).
        self._slot_prompts = (SlotPrompts(self.cache, prefix_cache, lambda n: sparse_prompt(model, backend, n))
                              if prefix_cache is not None else None)
        self._kv_floor = _sparse_floor(model, backend, self.cache.capacity)
        self.state = DecodeState(backend, kernel=kernel)
        self.stats = BatchStats()
        self._eos = set(model.tokenizer.eos_token_ids)
        self._waiting: deque[Request] = deque()
        self._prefilling: Request | None = None
        self._decoding: dict[int, Request] = {}           # slot -> request
        self._unreported: list[BatchEvent] = []            # the running step's events (see abort)
        self._free = list(range(max_batch))
        self._next_id = 0
        # A decode step's tokens and positions, filled on the host and copied in one transfer:
        # pinned on CUDA, so the copy does not wait for the GPU to drain (each step's sampling has
        # synced before the buffer is refilled).
        self._inputs = torch.zeros(2, max_batch, dtype=torch.long, pin_memory=model.device.type == "cuda")
        # Decode steps replayed from CUDA graphs (rows at different refresh phases included), else eager.
        if cuda_graph is None:
            cuda_graph = model.device.type == "cuda" and not lagged
        self._graphs = GraphDecoder(model, self.cache, self.state) if cuda_graph else None

    def _allocate(self, offload: bool | OffloadConfig | None) -> KVCache | OffloadKVCache:
        """Plan first, so a server that cannot hold its slots fails at start with the numbers.
        ``offload``: the slots' KV in host memory (True / an OffloadConfig; None: when it does not fit)."""
        try:
            return make_cache(self.model, self.max_batch, self.max_context, self.chunk_size, offload, self.backend)
        except CapacityError as e:
            raise CapacityError(f"{e} For batching: lower max_batch ({self.max_batch}) or max_context "
                                f"({self.max_context:,}).") from None

    # -- requests ---------------------------------------------------------------------------

    def add(self, ids: list[int], params: SamplingParams) -> int:
        """Queue a prompt (token ids); returns the request id that its events carry."""
        # operator.index, not int: int() read text "123" as ids [1, 2, 3] and cut 1.5 to 1, silently.
        try:
            ids = [operator.index(t) for t in ids]
        except TypeError:
            raise ValueError(f"a prompt here is token ids (integers), got {ids!r:.60}: encode text first "
                             "(engine.encode_prompt)") from None
        if not ids:
            raise ValueError("empty prompt: give at least one token of text")
        check_token_ids(ids, self.model.net.args.vocab_size)   # here: in a step it failed every request holding a slot
        if len(ids) + params.max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"capacity of {self.max_context} tokens per request; shorten the prompt or lower "
                             "max_new_tokens")
        gen = None
        if params.seed is not None:  # its own generator: its draws don't depend on its neighbours
            gen = torch.Generator(device=self.model.device).manual_seed(params.seed)
        req = Request(self._next_id, ids, params, gen, TextOutput(self.model.tokenizer, params, self._eos, ids))
        self._next_id += 1
        self._waiting.append(req)
        return req.rid

    def cancel(self, rid: int) -> bool:
        """Drop a request wherever it is, freeing its slot; False if it is not here (any more)."""
        for req in self._waiting:
            if req.rid == rid:
                self._waiting.remove(req)
                self.stats.cancelled += 1
                return True
        req = self._prefilling if self._prefilling is not None and self._prefilling.rid == rid else None
        req = req or next((r for r in self._decoding.values() if r.rid == rid), None)
        if req is None:
            return False
        self._release(req)
        self.stats.cancelled += 1
        return True

    def abort(self) -> list[int]:
        """After a failed step: drop every request holding a slot (their KV and masks may be half
        written) and return their ids, with those of requests the step finished; waiting
        requests stay queued."""
        held = ([self._prefilling] if self._prefilling is not None else []) + list(self._decoding.values())
        for req in held:
            if self._slot_prompts is not None:
                self._slot_prompts.drop(req.slot)
            self._release(req)
        self.state = DecodeState(self.backend, kernel=self.kernel)
        if self._graphs is not None:   # it steps this state (its static masks stay: each new row prunes anew)
            self._graphs.state = self.state
        # Those that finished within the failed step hold no slot any more, but their last event
        # was lost with the step's: without them here, their callers waited forever.
        lost, self._unreported = [e.request for e in self._unreported if e.finished], []
        return [r.rid for r in held] + lost

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_active(self) -> int:
        return len(self._decoding) + (self._prefilling is not None)

    # -- one scheduling round ---------------------------------------------------------------

    def step(self) -> list[BatchEvent]:
        """Prefill chunks while ``prefill_budget`` prompt tokens last, then decode one token for
        every request that has finished its prefill. Returns the events of this step."""
        events: list[BatchEvent] = []
        self._unreported = events       # for abort(), should this step fail
        self._prefill_some(events)
        parked = self._parking()
        if self._decoding and parked is not None:
            self._decode(events, parked)
        self._unreported = []
        return events

    def _parking(self) -> int | None:
        """Where the row still prefilling takes the decode step's throwaway token: where its next
        prefill chunks write, so the throwaway K/V is overwritten — on the next page, since an FP8
        page re-encoded around it would re-quantize the prompt rows before it (layer by layer: the
        page after the whole prompt). None: no such page (an FP8 prompt ending in the slot's last
        page), so decode waits while the prompt's last tokens (less than a page: one round at the
        default budget) are prefilled -- layer by layer, while the whole prompt is (a request whose
        prompt fills its slot to the last page, leaving max_new_tokens under a page)."""
        if self._prefilling is None:
            return 0
        req, page = self._prefilling, getattr(self.cache, "page", 1)
        # Layer by layer, positions up to the prompt's end are written in some layers already.
        filled = len(req.ids) if req.layers is not None else req.filled
        parked = -(-filled // page) * page
        if parked < self.cache.capacity:
            return parked
        return None if stores_fp8(self.cache) else filled

    def _prefill_some(self, events: list[BatchEvent]):
        budget = self.prefill_budget
        while budget > 0:
            req = self._prefilling or self._admit()
            if req is None:
                return
            budget -= self._prefill_chunk(req)
            if req.filled == len(req.ids):
                self._start_decoding(req, events)
                self._prefilling = None   # only now: should sampling fail, abort() frees its slot

    def _admit(self) -> Request | None:
        """The oldest waiting request, in a free slot, starting from the longest prefix of its
        prompt that a slot (``slot_prompts.py``) or the prefix cache holds."""
        if not self._waiting or not self._free:
            return None
        req, pc, slots = self._waiting.popleft(), self.prefix_cache, self._slot_prompts
        req.sparse = sparse_prompt(self.model, self.backend, len(req.ids))
        cached = pc.lookup(req.ids, self.owner, req.sparse) if pc is not None else (0, None)
        pick = slots.pick(req.ids, self._free, beat=cached[0]) if slots is not None else (min(self._free), None, 0)
        req.slot = pick[0]
        self._free.remove(req.slot)
        self._prefilling = req   # before any copy: should one fail, abort() frees the slot
        if pc is not None:   # (slots too: a runner with a prefix cache keeps prompts in its slots)
            req.reused = slots.fill(*pick, req.ids)
            if req.reused:
                pc.count(req.reused)
            else:
                req.reused = pc.reuse(req.ids, self._row(req.slot), self.owner, found=cached, sparse=req.sparse)
            req.filled = req.reused
            self.stats.reused_tokens += req.reused
        return req

    def _prefill_chunk(self, req: Request) -> int:
        """Prefill the next ``chunk_size`` prompt tokens of ``req``; returns how many."""
        start, end = req.filled, min(req.filled + self.chunk_size, len(req.ids))
        if req.tokens is None:  # made once: a long document is prefilled over many steps
            req.tokens = torch.tensor([req.ids], device=self.model.device)             # (1, T)
            req.layers = layer_prefill.begin(self.model, req.tokens, self._row(req.slot), AttentionCall(
                backend=self.backend, kernel=self.kernel, sparse=req.sparse), chunk_size=self.chunk_size, start=start)
        t0 = time.perf_counter()
        if req.layers is not None:   # a chunk's worth of its (layer, chunk) units
            ran = req.layers.run(self.chunk_size)
            req.logits, end = req.layers.logits, len(req.ids) if req.layers.logits is not None else start
        else:
            req.logits = prefill(self.model, req.tokens[:, :end], self._row(req.slot), backend=self.backend,
                                 chunk_size=self.chunk_size, kernel=self.kernel, start=start, prompt_len=len(req.ids))
            ran = end - start
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prefill_chunks += 1
        self.stats.prefilled_tokens += ran
        req.filled = end
        if end == len(req.ids):   # the whole prompt is in the slot
            req.tokens = req.layers = None
            if self.prefix_cache is not None:   # counted there, kept in its slot (not copied to an entry)
                self.prefix_cache.remember(req.ids, self._row(req.slot), reused=req.reused, keep=False)
                self._slot_prompts.prefilled(req.slot, req.ids)
        return ran

    def _start_decoding(self, req: Request, events: list[BatchEvent]):
        """Sample the first token from the prompt's logits; the row joins decode unless done."""
        tok = int(sample(req.logits, req.params, req.generator)[0])
        req.logits, req.seqlen = None, len(req.ids)
        if self._emit(req, tok, events):
            return
        self.state.admit(req.slot, self.max_batch)   # this row's refresh schedule restarts
        self._decoding[req.slot] = req

    def _decode(self, events: list[BatchEvent], parked: int):
        """One decode step for every decoding row; the row still prefilling (if any) rides along
        at ``parked`` (``_parking``), its output discarded."""
        tokens, seqlens = self._inputs.zero_()
        for slot, req in self._decoding.items():
            tokens[slot], seqlens[slot] = req.last, req.seqlen
        if self._prefilling is not None:
            seqlens[self._prefilling.slot] = parked
        kv_limit = max(int(seqlens.max()) + 1, self._kv_floor)
        tokens, seqlens = self._inputs.to(self.model.device, non_blocking=True, copy=True)   # not the buffer itself
        if self._graphs is not None:   # graphs read every slot: each row's length is data
            logits = self._graphs(tokens, seqlens)
        else:
            logits = decode_one_token(self.model, tokens, seqlens, self.cache, self.state, kv_limit=kv_limit)   # (B, V)
        n = len(self._decoding)
        self.stats.decode_steps += 1
        self.stats.batched_steps += n > 1
        self.stats.max_decoding = max(self.stats.max_decoding, n)
        for slot, req in list(self._decoding.items()):
            req.seqlen += 1
            self._emit(req, int(sample(logits[slot:slot + 1], req.params, req.generator)[0]), events)

    def _emit(self, req: Request, tok: int, events: list[BatchEvent]) -> bool:
        """Turn a sampled token into an event (text held back while a stop string may start);
        returns True, freeing the slot, when the request is finished."""
        piece, reason = req.output.push(tok)
        req.last = tok
        events.append(BatchEvent(req.rid, piece, tok, req.output.count, reason is not None, reason))
        if reason is None:
            return False
        self._release(req)
        self.stats.finished += 1
        return True

    def _release(self, req: Request):
        if self._prefilling is req:
            self._prefilling = None
        if req.layers is not None:   # the held layer and the prompt's hidden states go now
            req.layers.close()
            req.tokens = req.layers = None
        self._decoding.pop(req.slot, None)
        if req.slot >= 0 and req.slot not in self._free:
            self._free.append(req.slot)
            if self._slot_prompts is not None:
                self._slot_prompts.released(req.slot)
        req.slot = -1

    @property
    def n_slot_prompts(self) -> int:
        """Prompts kept in slots for reuse (``slot_prompts.py``)."""
        return 0 if self._slot_prompts is None else len(self._slot_prompts)

    def keep_prompts(self):
        """Copy the prompts kept in slots into the prefix cache's host entries (before saving it)."""
        if self._slot_prompts is not None:
            self._slot_prompts.keep(self.prefix_cache, self.owner)

    def _row(self, slot: int) -> KVCache:
        return self.cache.select(slice(slot, slot + 1))


def _sparse_floor(model, backend: str, capacity: int) -> int:
    """The fewest keys a decode step reads. hip_attention falls back to dense attention for the
    whole call when it has at most ``HiPConfig.dense_cutoff`` keys, so with the batch's longest
    row setting the key count a short row would switch between dense and sparse with its
    neighbours. Reading at least one key more keeps every row on the sparse path."""
    if backend == "dense":
        return 1
    cutoff = model.net.dense_cutoff
    return min(cutoff + 1, capacity)
