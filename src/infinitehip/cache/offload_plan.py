"""Where an offloaded KV cache lives and whether it fits: host memory, spare GPU memory, or both.

Every layer's store has the same format wherever it is (``offload.HostKVStore``: pages of
``page`` tokens, model dtype or FP8 codes + per-page scales). Host-stored layers sit in
page-locked host memory (read in place, or behind a small GPU page cache: pools + table); the
``OffloadConfig.gpu_layers`` GPU-stored layers keep their whole store in GPU memory and are
read in place (no pool, no table, no PCIe). So the longest context is bounded by host memory
plus the GPU memory the weights and the page caches leave, not by host memory alone.

Legend: L layers, g GPU-stored layers, B batch, C capacity (tokens per row, a multiple of
``OffloadConfig.capacity_unit``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..attention.mask import window_slots
from ..config import HiPConfig, is_int, is_number
from .kv import CapacityError, free_memory

GIB = 1 << 30
# Of the available host memory the store may take: it is page-locked, and the OS, this process
# and CUDA's own pinned buffers need the rest (pinning everything gets the process killed).
HOST_USE = 0.9
# Of the free GPU memory that automatic placement fills with whole layers, besides the workspace:
# the allocator's fragmentation and the pruning kernels' temporaries (which grow with the
# context) need the rest. An explicit ``gpu_layers`` may use all of it.
GPU_USE = 0.9


@dataclass(frozen=True)
class OffloadConfig:
    """page: tokens per page (a power of two; default the paper's final chunk size).
    fp8: store K/V as float8 e4m3 with one scale per (page, kv head): half the bytes, not
    bit-identical (error bound in ``offload.py``). GPU-stored layers use the same format.
    gpu_pages: slots per layer in the GPU page cache (a slot = one page of one kv head); None:
    ``headroom`` x the most units one decode step of the batch reads (sink + window + selected chunks).
    decode_cache: decode attention reads through a GPU page cache of the (page, kv head) units the
    masks select (True, the default: ``gpu_pages.PageCache``, LRU bookkeeping as tensor ops on the
    GPU, captured in CUDA graphs; 1.9x the tokens/s of reading in place at 256K in bf16, 1.4x in
    FP8, measured) or, like prefill, in place from host memory (False: no pools; every attended
    key crosses PCIe each step).
    gpu_layers: how many layers keep their whole store in GPU memory (read in place, no page
    cache), taken in ``gpu_layer_order``. None: automatic (``plan_offload``): 0 while host
    memory holds every layer (the small GPU footprint), else as many as the spare GPU memory
    holds. 0: every layer in host memory.
    probe_stride: a host-stored layer also keeps in GPU memory its keys at every ``probe_stride``-th
    position (K only, store format: 1/(2 x stride) of the store's bytes), which pruning reads
    there instead of over PCIe: the first stage's first three levels probe only multiples of 16
    (all its levels with ``HiPConfig.stage0_levels = 3``). 0: none."""

    page: int = 8
    fp8: bool = False
    gpu_pages: int | None = None
    headroom: float = 1.5
    decode_cache: bool = True
    gpu_layers: int | None = None
    probe_stride: int = 16

    def __post_init__(self):
        p = self.page
        if not is_int(p) or p < 1 or p & (p - 1):
            raise ValueError(f"OffloadConfig.page={p!r} must be a power of two (tokens per page of the host store; "
                             "8, the default, is the paper's final chunk size)")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"OffloadConfig.fp8={self.fp8!r}: use False (the store in the model's dtype) or True "
                             "(float8 e4m3 with a scale per page and kv head: half the bytes)")
        if not isinstance(self.decode_cache, bool):
            raise ValueError(f"OffloadConfig.decode_cache={self.decode_cache!r}: use False (decode reads host memory "
                             "in place) or True (through a GPU page cache of the selected pages)")
        if self.gpu_pages is not None and (not is_int(self.gpu_pages) or self.gpu_pages < 1):
            raise ValueError(f"OffloadConfig.gpu_pages={self.gpu_pages!r} must be None (sized from one decode step) "
                             "or a positive number of page slots per layer")
        if not is_number(self.headroom) or not 1 <= self.headroom < math.inf:   # inf: no slot count (OverflowError)
            raise ValueError(f"OffloadConfig.headroom={self.headroom!r} must be a finite number >= 1: the page cache "
                             "holds headroom x the pages one decode step reads, and fewer cannot serve a step")
        if self.gpu_layers is not None and (not is_int(self.gpu_layers) or self.gpu_layers < 0):
            raise ValueError(f"OffloadConfig.gpu_layers={self.gpu_layers!r} must be None (automatic) or a number of "
                             "layers >= 0 kept whole in GPU memory")
        s = self.probe_stride
        if not is_int(s) or s < 0 or s & (s - 1):
            raise ValueError(f"OffloadConfig.probe_stride={s!r} must be 0 (no GPU copy of probe keys) or a power of "
                             "two (keys at its multiples kept on the GPU for pruning; 16 serves stage 0's first "
                             "three levels)")

    @property
    def capacity_unit(self) -> int:
        """Tokens per row are a multiple of this: whole pages, and whole probe strides."""
        return max(self.page, self.probe_stride)


def step_units(config: HiPConfig, n_kv_heads: int, page: int) -> int:
    """The most (page, kv head) units one decode step of one row reads in one layer: every head's
    sink and window pages, and the selected chunks' pages of each head."""
    sink = -(-config.sink // page)
    window = -(-window_slots(config) // page) + 1
    return n_kv_heads * (sink + window + config.n_selected * max(1, config.chunk_size // page))


def cache_slots(layer_configs: list[HiPConfig], batch: int, n_kv_heads: int, config: OffloadConfig) -> list[int]:
    """Slots of each layer's GPU page cache: ``gpu_pages``, or ``headroom`` x one step's working
    set; none without ``decode_cache``."""
    if not config.decode_cache:
        return [0] * len(layer_configs)
    return [config.gpu_pages or max(1, int(config.headroom * batch * step_units(c, n_kv_heads, config.page)))
            for c in layer_configs]


def cache_bytes(n_slots: int, head_dim: int, dtype: torch.dtype, config: OffloadConfig) -> int:
    """Device bytes of a page cache of ``n_slots`` (``PageCache.nbytes`` less its table's per-token
    part): per slot, plus the scratch slot, a page of one kv head decoded (K and V, model dtype)
    and its owner and stamp (int64); the table's scratch entry (int32). 0 slots: no cache."""
    if not n_slots:
        return 0
    return (n_slots + 1) * (2 * config.page * head_dim * torch.finfo(dtype).bits // 8 + 16) + 4


def gpu_layer_order(layer_configs: list[HiPConfig], batch: int, n_kv_heads: int, config: OffloadConfig) -> list[int]:
    """Layers in the order they move to GPU memory: largest page cache first (the dense layers,
    which read the most pages per step: moving them frees the most pool and PCIe traffic), then
    by index. ``gpu_layers = g`` puts the first g of this list on the GPU."""
    slots = cache_slots(layer_configs, batch, n_kv_heads, config)
    return sorted(range(len(slots)), key=lambda i: -slots[i])


def layer_bytes_per_token(n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                          config: OffloadConfig = OffloadConfig()) -> float:
    """One layer's store bytes per token, K and V (FP8: one byte per element plus the page scales)."""
    if config.fp8:
        return 2 * n_kv_heads * (head_dim + 4 / config.page)
    return 2 * n_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def host_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                         config: OffloadConfig = OffloadConfig()) -> float:
    """Store bytes per token, all layers, K and V (the host store when no layer is on the GPU)."""
    return n_layers * layer_bytes_per_token(n_kv_heads, head_dim, dtype, config)


@dataclass(frozen=True)
class OffloadPlan:
    """Where each layer's store goes and what it costs, all batch rows."""

    gpu_layers: tuple[int, ...]     # layers whose whole store is in GPU memory
    host_bytes: int                 # the other layers' stores (page-locked host memory)
    gpu_bytes: int                  # GPU-stored layers + the host-stored layers' pools and tables
    config: OffloadConfig           # the config asked for, gpu_layers resolved to a count


class _Sizes:
    """Bytes of each placement of one cache shape: the first g layers of ``order`` on the GPU."""

    def __init__(self, n_layers, n_kv_heads, head_dim, batch, dtype, layer_configs, config):
        self.L, self.batch, self.unit, self.dtype = n_layers, batch, config.capacity_unit, dtype
        self.order = gpu_layer_order(layer_configs, batch, n_kv_heads, config)
        # Per host-stored layer, fixed: its page cache, and its probe copy's dump row.
        dump = n_kv_heads * head_dim * (1 if config.fp8 else torch.finfo(dtype).bits // 8) if config.probe_stride else 0
        self.pool = [cache_bytes(n, head_dim, dtype, config) + dump
                     for n in cache_slots(layer_configs, batch, n_kv_heads, config)]
        self.store = batch * layer_bytes_per_token(n_kv_heads, head_dim, dtype, config)   # one layer, per token
        # A host-stored layer keeps on the GPU its table (int32 per (page, kv head)), FP8 scales
        # (K and V: float32 per (page, kv head)); its codes are the rest of ``store``.
        self.table = batch * 4 * n_kv_heads / config.page if config.decode_cache else 0
        self.scales = batch * 2 * 4 * n_kv_heads / config.page if config.fp8 else 0
        # and its probe copy: keys (codes) at every probe_stride-th token, K only. Per token, GPU:
        probes = (self.store - self.scales) / 2 / config.probe_stride if config.probe_stride else 0
        self.on_gpu = self.table + self.scales + probes

    def pools(self, g: int) -> int:
        return sum(self.pool[i] for i in self.order[g:])

    def host(self, g: int, tokens: int) -> int:
        return int((self.L - g) * (self.store - self.scales) * tokens)

    def gpu(self, g: int, tokens: int) -> int:
        return int(g * self.store * tokens + (self.L - g) * self.on_gpu * tokens) + self.pools(g)

    def on_host(self, g: int, tokens: int) -> int:
        """Host bytes of placement g when there is no GPU (the device is the host, CPU): the
        "GPU-stored" layers' whole stores are in host memory too."""
        return self.host(g, tokens) + int(g * self.store * tokens)

    def longest(self, g: int, host_budget: float, gpu_budget: float | None) -> int:
        """Most tokens per row (a multiple of the capacity unit) placement g holds within both budgets
        (``gpu_budget`` None: no GPU, the device is the host, which holds every layer's store)."""
        if gpu_budget is None:
            cap = host_budget / ((self.L - g) * (self.store - self.scales) + g * self.store)
        else:
            host = host_budget / ((self.L - g) * (self.store - self.scales)) if g < self.L else float("inf")
            per_gpu = g * self.store + (self.L - g) * self.on_gpu
            cap = min(host, (gpu_budget - self.pools(g)) / per_gpu if per_gpu else float("inf"))
        n = int(max(0.0, cap)) // self.unit * self.unit
        while n > 0 and (self.on_host(g, n) > host_budget if gpu_budget is None else   # float rounding
                         self.host(g, n) > host_budget or self.gpu(g, n) > gpu_budget):
            n -= self.unit
        return n


@dataclass(frozen=True)
class _Budgets:
    free_host: int
    host: float                 # what the host store may take
    free_gpu: int | None        # None: no GPU (the device is the host), nothing is checked there
    gpu: float | None           # the pools and tables of an all-host placement, or an explicit one
    auto: float | None          # an automatic placement with GPU-stored layers


def _budgets(device: torch.device, workspace: int, free_host: int | None, free_gpu: int | None) -> _Budgets:
    free_host = free_memory(torch.device("cpu")) if free_host is None else free_host
    if free_gpu is None and device.type != "cuda":
        return _Budgets(free_host, HOST_USE * free_host, None, None, None)
    free_gpu = free_memory(device) if free_gpu is None else free_gpu
    return _Budgets(free_host, HOST_USE * free_host, free_gpu, free_gpu - workspace, GPU_USE * free_gpu - workspace)


def plan_offload(*, n_layers: int, n_kv_heads: int, head_dim: int, batch: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, layer_configs: list[HiPConfig],
                 config: OffloadConfig = OffloadConfig(), workspace: int = 0,
                 free_host: int | None = None, free_gpu: int | None = None) -> OffloadPlan:
    """Check, before allocating, that an offloaded cache fits; place its layers (``gpu_layers``).

    ``free_host`` / ``free_gpu``: available bytes (default: measured now; on a non-CUDA device
    without ``free_gpu`` only the host is checked and automatic placement keeps every layer
    there). Raises CapacityError with the numbers and the ways out.
    """
    sizes = _Sizes(n_layers, n_kv_heads, head_dim, batch, dtype, layer_configs, config)
    b = _budgets(torch.device(device), workspace, free_host, free_gpu)
    tokens = -(-capacity // config.capacity_unit) * config.capacity_unit
    if config.gpu_layers is None:
        g = _auto_layers(sizes, b, tokens)
        if g is None:
            _raise_auto(sizes, b, config, tokens, workspace, torch.device(device))
    else:
        g = config.gpu_layers
        if not 0 <= g <= n_layers:
            raise ValueError(f"OffloadConfig.gpu_layers={g} must be between 0 and {n_layers} (the model's layers), "
                             "or None (automatic)")
        _check_placement(sizes, b, config, g, tokens, workspace, torch.device(device))
    return OffloadPlan(tuple(sorted(sizes.order[:g])), sizes.host(g, tokens), sizes.gpu(g, tokens),
                       replace(config, gpu_layers=g))


def _auto_layers(sizes: _Sizes, b: _Budgets, tokens: int) -> int | None:
    """0 when the host holds every layer (and the GPU the page caches); else the most layers the
    spare GPU memory holds with the rest fitting the host; None when no placement fits."""
    def fits(g: int) -> bool:
        gpu_ok = b.gpu is None or sizes.gpu(g, tokens) <= (b.gpu if g == 0 else b.auto)
        return sizes.host(g, tokens) <= b.host and gpu_ok
    if fits(0):
        return 0
    if b.gpu is None:           # no GPU: nowhere else to put a layer
        return None
    return max((g for g in range(1, sizes.L + 1) if fits(g)), default=None)


def _check_placement(sizes: _Sizes, b: _Budgets, config: OffloadConfig, g: int, tokens: int, workspace: int,
                     device: torch.device):
    """An explicit ``gpu_layers``: each memory must hold its part (without a GPU the host holds both)."""
    no_gpu = b.gpu is None
    host, gpu = sizes.on_host(g, tokens) if no_gpu else sizes.host(g, tokens), sizes.gpu(g, tokens)
    if host > b.host:
        fits = sizes.longest(g, b.host, None if no_gpu else float("inf"))
        more_gpu = "" if no_gpu else ("Keep more layers in GPU memory (OffloadConfig.gpu_layers, --offload-gpu-layers; "
                                      "None picks them), or use")
        raise CapacityError(
            f"the offloaded KV cache for {sizes.batch} x {tokens:,} tokens needs {host / GIB:.2f} GiB of host memory "
            f"({sizes.L if no_gpu else sizes.L - g} of {sizes.L} layers there"
            f"{f'; {device} is the host' if no_gpu else ''}) but only {b.host / GIB:.2f} GiB are available "
            f"({HOST_USE:.0%} of {b.free_host / GIB:.2f} GiB free); at most ~{fits:,} tokens per sequence fit."
            f"{_fp8_hint(config, sizes.dtype)} "
            f"{more_gpu or 'Use'} a shorter prompt, fewer new tokens, or fewer prompts at once.")
    if b.gpu is not None and gpu > b.gpu:
        raise CapacityError(
            f"the GPU part of the offloaded KV cache ({g} layers' whole KV, page caches of the other "
            f"{sizes.L - g}) needs {gpu / GIB:.2f} GiB (+{workspace / GIB:.2f} GiB workspace) but only "
            f"{b.free_gpu / GIB:.2f} GiB are free on {device}; "
            f"{'keep fewer layers in GPU memory (OffloadConfig.gpu_layers), ' if g else ''}"
            "give the page cache fewer slots (OffloadConfig.gpu_pages), a smaller prefill chunk, "
            "or fewer prompts at once.")


def _raise_auto(sizes: _Sizes, b: _Budgets, config: OffloadConfig, tokens: int, workspace: int, device: torch.device):
    """No automatic placement fits: say what each memory holds and the longest context that fits."""
    if sizes.host(0, tokens) <= b.host:     # the host is not the problem: the page caches are
        _check_placement(sizes, b, config, 0, tokens, workspace, device)
    need = sizes.host(0, tokens)
    fits = _longest(sizes, b)
    if b.gpu is None:
        gpu = f"no GPU memory ({device} is the host)"
    else:
        spare = max(0.0, b.auto - sizes.pools(0))
        gpu = (f"~{spare / GIB:.2f} GiB of spare GPU memory on {device} ({GPU_USE:.0%} of {b.free_gpu / GIB:.2f} GiB "
               f"free, less {workspace / GIB:.2f} GiB workspace and the page caches)")
    raise CapacityError(
        f"the offloaded KV cache for {sizes.batch} x {tokens:,} tokens needs {need / GIB:.2f} GiB "
        f"({sizes.L} layers x {need / sizes.L / GIB:.2f} GiB) but host and GPU memory together hold less: "
        f"{b.host / GIB:.2f} GiB of host memory ({HOST_USE:.0%} of {b.free_host / GIB:.2f} GiB free) and {gpu}; "
        f"at most ~{fits:,} tokens per sequence fit.{_fp8_hint(config, sizes.dtype)} "
        "Use a shorter prompt, fewer new tokens, or fewer prompts at once.")


def _fp8_hint(config: OffloadConfig, dtype: torch.dtype) -> str:
    """FP8 stores one byte a value in host memory (its scales are on the GPU): the host store
    shrinks by the model dtype's bytes, so float32 (the CPU default) quarters it, not halves it."""
    if config.fp8:
        return ""
    size = torch.finfo(dtype).bits // 8
    cut = {2: "halves it", 4: "quarters it"}.get(size, f"divides it by {size}")
    name = str(dtype).removeprefix("torch.")
    return f" FP8 storage (--offload-fp8: 1 byte a value instead of {name}'s {size}) {cut}."


def _longest(sizes: _Sizes, b: _Budgets, gpu_layers: int | None = None) -> int:
    """Most tokens per row any allowed placement holds (the one ``gpu_layers`` names, or any)."""
    def budget(g):
        return None if b.gpu is None else (b.gpu if g == 0 or gpu_layers is not None else b.auto)
    if gpu_layers is not None:
        return sizes.longest(gpu_layers, b.host, budget(gpu_layers))
    candidates = range(sizes.L + 1) if b.gpu is not None else [0]
    return max(sizes.longest(g, b.host, budget(g)) for g in candidates)


def longest_offload_context(*, n_layers: int, n_kv_heads: int, head_dim: int, batch: int, dtype: torch.dtype,
                            device: torch.device, layer_configs: list[HiPConfig],
                            config: OffloadConfig = OffloadConfig(), workspace: int = 0,
                            free_host: int | None = None, free_gpu: int | None = None) -> tuple[int, OffloadPlan]:
    """The longest capacity per row (tokens, a page multiple) an offloaded cache can have here, and
    ``plan_offload``'s plan for it: host memory plus, when ``config.gpu_layers`` allows
    (None: automatic), whole layers in the spare GPU memory."""
    sizes = _Sizes(n_layers, n_kv_heads, head_dim, batch, dtype, layer_configs, config)
    b = _budgets(torch.device(device), workspace, free_host, free_gpu)
    n = max(config.capacity_unit, _longest(sizes, b, config.gpu_layers))
    plan = plan_offload(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, batch=batch, capacity=n,
                        dtype=dtype, device=device, layer_configs=layer_configs, config=config,
                        workspace=workspace, free_host=b.free_host, free_gpu=b.free_gpu)
    return n, plan
