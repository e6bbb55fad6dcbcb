"""Context caching: the KV of a long shared prefix (a document) is prefilled once and reused.

Entries are whole prompts' KV, matched on token ids in blocks of ``block_tokens``: a request
whose ids start with a cached entry's ids copies that many tokens of KV and prefills only the
rest. Entries can be saved to and loaded from disk (safetensors), so a million-token document
is read once, not once per question or per server start. A file carries the ``fingerprint`` of
the model, backend and HiP config that wrote it, and loads only into the same: KV from other
weights, another attention, or rotated keys (as the dense backend caches them) in an un-rotated
cache would answer wrongly without an error. For the same reason every entry in memory carries
its writer's fingerprint (``owner``) and is reused only by the same model and backend. And hip
prefills a prompt past the dense cutoff sparsely in every chunk (``engine.prefill``), the same
tokens of a shorter prompt densely: an entry is marked ``sparse`` or not and reused only by
prompts prefilled the same way, so a reused prefix holds the KV a fresh prefill would compute.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache.kv import KVCache, free_memory

log = logging.getLogger("infinitehip.engine")
# An entry may take at most this share of the host memory available when it is made.
HOST_SHARE = 0.5


def fingerprint(model, backend: str, fp8: bool = False) -> str:
    """What a cached prefix's KV depends on: the architecture and shapes, the dtype, the weights
    (sampled: the first layer's q/k/v and the embedding's first rows), the backend (dense caches
    rotated keys; hip and streaming attend differently, so every layer after the first sparse one
    holds other values), for the sparse backends the HiP config of every layer, and FP8 host
    storage (``fp8``: every layer after the first holds values computed from rounded K/V)."""
    net = model.net
    sample = [net.layers[0].attention.wqkv.weight, net.tok_embeddings.weight[:64]]
    sums = ",".join(f"{float(w.detach().double().sum()):.17g}" for w in sample)   # (a random model's weights may want grad)
    hip = "" if backend == "dense" else repr(net.layer_configs)
    store = "|fp8" if fp8 else ""   # appended: the fingerprints of files written without FP8 stay valid
    return hashlib.sha256(f"{model.args}|{model.dtype}|{backend}|{hip}|{sums}{store}".encode()).hexdigest()[:32]


def shared_prefix(held: torch.Tensor, query: torch.Tensor, block: int) -> int:
    """How many tokens ``held`` and ``query`` (token ids) share from the start, in whole blocks."""
    n = min(len(held), len(query))
    same = int((held[:n] == query[:n]).long().cumprod(0).sum()) if n else 0
    return same - same % block


def stores_fp8(cache) -> bool:
    """Whether ``cache`` keeps its K/V as FP8 codes (an offloaded cache with ``OffloadConfig.fp8``)."""
    config = getattr(cache, "config", None)
    return bool(getattr(config, "fp8", False))


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0      # tokens whose prefill was skipped
    prefilled_tokens: int = 0   # tokens the engine actually prefilled


@dataclass
class _Entry:
    ids: torch.Tensor           # (T,) int64
    k: list[torch.Tensor]       # per layer (T, K, D)
    v: list[torch.Tensor]
    owner: str = ""             # the writer's ``fingerprint``: only it may reuse the KV
    sparse: bool = False        # prefilled sparsely (a prompt past the dense cutoff): only such reuse it


class PrefixCache:
    def __init__(self, *, block_tokens: int = 256, min_tokens: int = 1024, max_entries: int = 4):
        self.block_tokens, self.min_tokens, self.max_entries = block_tokens, min_tokens, max_entries
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int], owner: str = "", sparse: bool = False) -> tuple[int, int | None]:
        """(n, key): the longest cached prefix of ``ids`` that ``owner`` (the reader's
        ``fingerprint``) wrote, in whole blocks, leaving at least the last prompt token to prefill
        (its logits start decoding); (0, None) if none. ``sparse``: ``ids`` is prefilled sparsely
        (``generate.sparse_prompt``); only entries prefilled alike match."""
        query = torch.tensor(ids[:-1])
        best, best_key = 0, None
        for key, e in self._entries.items():
            if e.owner != owner or e.sparse != sparse:
                continue
            same = shared_prefix(e.ids, query, self.block_tokens)
            if same > best:
                best, best_key = same, key
        return best, best_key

    def reuse(self, ids: list[int], cache: KVCache, owner: str = "", found: tuple[int, int | None] | None = None,
              sparse: bool = False) -> int:
        """Copy the longest cached prefix of ``ids`` into row 0 of ``cache``; return its length.

        Only entries ``owner`` wrote match: one PrefixCache used with the dense backend and then
        hip handed hip dense's rotated keys (wrong answers, no error). ``found``: ``lookup``'s
        answer, if already asked; ``sparse``: as ``lookup``.
        """
        best, best_key = found or self.lookup(ids, owner, sparse)
        if best_key is None:
            self.count(0)
            return 0
        entry = self._entries[best_key]
        self._entries.move_to_end(best_key)
        row0 = torch.zeros(1, dtype=torch.long, device=cache.device)
        for layer, (k, v) in enumerate(zip(entry.k, entry.v)):   # the cache's own write path (any cache)
            cache.update(layer, row0, k[None, :best].to(cache.device), v[None, :best].to(cache.device))
        self.count(best)
        return best

    def count(self, reused: int):
        """Count a lookup that reused ``reused`` tokens (here or, for a batch runner, from a slot)."""
        self.stats.lookups += 1
        self.stats.hits += reused > 0
        self.stats.reused_tokens += reused

    def remember(self, ids: list[int], cache: KVCache, reused: int, owner: str = "", keep: bool = True,
                 sparse: bool = False):
        """After prefilling ``ids`` (of which ``reused`` came from a cache): count the tokens
        prefilled and, with ``keep``, keep the prompt's KV for later requests."""
        self.stats.prefilled_tokens += len(ids) - reused
        if keep:
            self.store(ids, cache, owner, sparse)

    def store(self, ids: list[int], cache: KVCache, owner: str = "", sparse: bool = False):
        """Keep the prompt's KV (row 0 of ``cache``, whole blocks only) if it is long enough;
        ``owner``: the writer's ``fingerprint``; ``sparse``: ``ids`` was prefilled sparsely."""
        n = len(ids) - len(ids) % self.block_tokens
        if n < max(self.min_tokens, self.block_tokens):
            return
        key = hash((owner, sparse, tuple(ids[:n])))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        k1, v1 = cache.read_prefix(0, 1)
        need = (k1.nbytes + v1.nbytes) * n * cache.n_layers    # in the model's dtype, also from an FP8 store
        if need > HOST_SHARE * free_memory(torch.device("cpu")):
            # An offloaded million-token prompt's KV (131 GB at 8B in bf16) does not fit beside
            # its own host store: copied anyway, the host runs out of memory.
            log.warning("context cache: a %d-token prompt's KV (%.1f GB) is not kept: more than %d%% of the "
                        "host memory available", n, need / 1e9, 100 * HOST_SHARE)
            return
        kv = [cache.read_prefix(layer, n) for layer in range(cache.n_layers)]
        self._entries[key] = _Entry(torch.tensor(ids[:n]), [k for k, _ in kv], [v for _, v in kv], owner, sparse)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def save(self, path: str | Path, owner: str = ""):
        """Write the entries ``owner`` (the writer's ``fingerprint``) made to one safetensors file."""
        tensors = {}
        mine = [e for e in self._entries.values() if e.owner == owner]   # the file is labelled as owner's
        for i, e in enumerate(mine):
            tensors[f"{i}.ids"] = e.ids
            for layer, (k, v) in enumerate(zip(e.k, e.v)):
                tensors[f"{i}.k.{layer}"], tensors[f"{i}.v.{layer}"] = k.contiguous().cpu(), v.contiguous().cpu()
        # Written beside, then renamed over: a save cut short (a full disk, a stop signal's kill)
        # left a truncated file, which lost the old entries and failed the next start.
        part = Path(f"{path}.part")
        try:
            sparse = ",".join(str(i) for i, e in enumerate(mine) if e.sparse)
            save_file(tensors, str(part), metadata={"format": "infinitehip-prefix-cache", "entries": str(len(mine)),
                                                    "owner": owner, "sparse": sparse})
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)

    def load(self, path: str | Path, device=None, owner: str = ""):
        """Add the entries saved in ``path``, which ``owner`` (the reader's ``fingerprint``) must
        have written."""
        try:
            with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
                meta = f.metadata() or {}
                written_by = meta.get("owner", "")
                tensors = {name: f.get_tensor(name) for name in f.keys()} if written_by == owner else {}
        except Exception as e:  # safetensors raises several types for a bad file
            raise ValueError(f"{path} is not a readable prefix-cache file ({e})") from None
        if written_by != owner:
            raise ValueError(f"{path} holds KV written by another model, weights or backend (fingerprint "
                             f"{written_by or 'none'}; this one is {owner or 'none'}): delete it or give "
                             "another --context-cache path")
        # Files from before the mark hold prompts whose chunks under the dense cutoff were dense:
        # unmarked, so only prompts under the cutoff reuse them, for at most their own length.
        sparse = {int(i) for i in meta.get("sparse", "").split(",") if i}
        for i in sorted({int(name.split(".")[0]) for name in tensors}):
            n_layers = sum(name.startswith(f"{i}.k.") for name in tensors)
            ids = tensors[f"{i}.ids"].cpu()
            self._entries[hash((owner, i in sparse, tuple(ids.tolist())))] = _Entry(
                ids, [tensors[f"{i}.k.{layer}"] for layer in range(n_layers)],
                [tensors[f"{i}.v.{layer}"] for layer in range(n_layers)], owner, i in sparse)
        while len(self._entries) > self.max_entries:   # as store: a file may hold more than this cache keeps
            self._entries.popitem(last=False)
