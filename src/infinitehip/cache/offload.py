"""KV offloading building blocks: a host KV store (optionally FP8) and a GPU block cache.

The full cache of a layer lives in host memory (pinned when CUDA is present: plain page-locked
memory, never CUDA managed memory, which can hang the GPU when oversubscribed). The GPU holds a
fixed number of block slots; the sparse masks change only at refreshes, so the blocks a layer
needs move slowly and an LRU cache over them hits often. A store can also be allocated whole in
GPU memory (``on_device``, same format): a layer kept there needs no block cache.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# Round-trip error of one element x of a block whose absolute maximum is amax (e4m3: 3 mantissa
# bits, so half an ulp is 2^-4 of the value; values below the smallest normal are spaced
# amax / 448 * 2^-9 apart):  |x - decode(encode(x))| <= 2^-4 |x| + amax / 448 * 2^-10.
FP8_REL_ERROR = 2.0 ** -4


def fp8_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, block, K, D) -> (codes (N, block, K, D) float8_e4m3fn, scales (N, 1, K, 1) float32)."""
    amax = x.float().abs().amax(dim=(1, 3), keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).to(FP8), scale


def fp8_decode(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


def host_tensor(shape, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """A zeroed host tensor; page-locked and registered with CUDA when ``device`` is a GPU.

    Registered with ``cudaHostRegister`` rather than allocated with ``pin_memory=True``: PyTorch's
    pinned allocator rounds every allocation up to a power of two, which would waste up to half
    of the host memory a long context needs. Never CUDA managed memory.
    """
    t = torch.zeros(shape, dtype=dtype)
    if device is None or device.type != "cuda" or t.numel() == 0:
        return t
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.nbytes, 1 | 2)   # portable | mapped
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {t.nbytes / 2**30:.2f} GiB of host memory failed ({err}); "
                           "check the memlock limit (ulimit -l) or give the KV store less memory")
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


class _CudaArray:
    """A ``__cuda_array_interface__`` over raw bytes, keeping their owner alive."""

    def __init__(self, owner: torch.Tensor):
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (owner.nbytes,), "typestr": "|u1",
                                         "data": (owner.data_ptr(), False), "version": 2}


def device_alias(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """A tensor on ``device`` that reads and writes the registered host tensor ``t`` in place.

    Zero-copy: kernels given the alias load over PCIe exactly the bytes they touch (UVA: the
    host address of registered memory is valid on the device). On CPU it is ``t`` itself.
    """
    if device is None or device.type != "cuda" or t.numel() == 0:
        return t
    raw = torch.as_tensor(_CudaArray(t), device=device)                 # (nbytes,) uint8, no copy
    return raw.view(t.dtype).view(t.shape)


def _allocate(shape, dtype: torch.dtype, device: torch.device | None, on_device: bool):
    """(storage, what kernels read and write): one zeroed device tensor twice (``on_device``),
    or a registered host tensor and its device alias."""
    if on_device:
        t = torch.zeros(shape, dtype=dtype, device=device)
        return t, t
    t = host_tensor(shape, dtype, device)
    return t, device_alias(t, device)


class HostKVStore:
    """One layer's K and V in host memory, addressed by token block: (num_blocks, block, K, D).

    ``device``: the GPU that reads it. Then the store is registered page-locked memory and
    ``dk``/``dv`` (and ``dk_scale``/``dv_scale``) are device aliases of it: reads and writes
    are GPU kernels over mapped host memory, never a CPU-side copy. Without a device (or on
    CPU) the aliases are the host tensors themselves. ``on_device``: allocate the whole store
    in ``device`` memory instead (same format; ``k`` and ``dk`` are then the same tensor).
    """

    def __init__(self, num_blocks: int, block: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, fp8: bool = False, device: torch.device | str | None = None,
                 on_device: bool = False):
        device = None if device is None else torch.device(device)
        shape = (num_blocks, block, kv_heads, head_dim)
        self.dtype, self.fp8, self.on_device = dtype, fp8, on_device
        self.k, self.dk = _allocate(shape, FP8 if fp8 else dtype, device, on_device)
        self.v, self.dv = _allocate(shape, FP8 if fp8 else dtype, device, on_device)
        if fp8:
            self.k_scale, self.dk_scale = _allocate((num_blocks, 1, kv_heads, 1), torch.float32, device, on_device)
            self.v_scale, self.dv_scale = _allocate((num_blocks, 1, kv_heads, 1), torch.float32, device, on_device)
            self.k_scale.fill_(1.0)   # through the storage: the alias shares its bytes
            self.v_scale.fill_(1.0)

    @property
    def nbytes(self) -> int:
        extra = 2 * self.k_scale.nbytes if self.fp8 else 0
        return self.k.nbytes + self.v.nbytes + extra

    def write(self, blocks: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store whole blocks: blocks (N,) int64, k/v (N, block, K, D) (through the device alias)."""
        blocks = blocks.to(self.dk.device)
        if self.fp8:
            (kc, ks), (vc, vs) = fp8_encode(k), fp8_encode(v)
            dev = self.dk.device
            self.dk[blocks], self.dk_scale[blocks] = kc.to(dev), ks.to(dev)
            self.dv[blocks], self.dv_scale[blocks] = vc.to(dev), vs.to(dev)
        else:
            self.dk[blocks], self.dv[blocks] = k.to(self.dk.device, self.dtype), v.to(self.dk.device, self.dtype)

    def read(self, blocks: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks (N,) -> k, v (N, block, K, D) in the store's compute dtype, on ``device``.

        A gather over the device alias: on a GPU one kernel pulls just these blocks over PCIe.
        """
        blocks = blocks.to(self.dk.device)
        k, v = self.dk[blocks], self.dv[blocks]
        if self.fp8:
            k, v = fp8_decode(k, self.dk_scale[blocks], self.dtype), fp8_decode(v, self.dv_scale[blocks], self.dtype)
        return (k, v) if device is None else (k.to(device), v.to(device))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


class BlockCache:
    """A fixed number of device slots caching blocks of one HostKVStore, least recently used out.

    ``fetch(blocks)`` returns the slot of each requested block, copying misses in; a write to
    the store must go through ``write`` so no slot ever serves a stale block.
    """

    def __init__(self, store: HostKVStore, n_slots: int, device=None):
        self.store, self.n_slots = store, n_slots
        _, block, K, D = store.k.shape
        self.k = torch.zeros(n_slots, block, K, D, dtype=store.dtype, device=device)   # finite: masked reads
        self.v = torch.zeros_like(self.k)
        self.slot_of = torch.full((store.k.shape[0],), -1, dtype=torch.long)   # block -> slot
        self.block_of = torch.full((n_slots,), -1, dtype=torch.long)            # slot -> block
        self.last_use = torch.zeros(n_slots, dtype=torch.long)
        self.clock = 0
        self.stats = CacheStats()

    def fetch(self, blocks: torch.Tensor) -> torch.Tensor:
        """Slots (same shape as ``blocks``) holding the requested blocks, loading misses."""
        wanted, inverse = blocks.cpu().long().unique(return_inverse=True)
        if wanted.numel() > self.n_slots:
            raise ValueError(f"{wanted.numel()} distinct blocks requested at once but the cache has "
                             f"{self.n_slots} slots; give the block cache more slots")
        self.clock += 1
        slots = self.slot_of[wanted]
        hit = slots >= 0
        self.stats.hits += int(hit.sum())
        self.last_use[slots[hit]] = self.clock
        missing = wanted[~hit]
        if missing.numel():
            self.stats.misses += missing.numel()
            victims = self._victims(missing.numel())
            self.stats.evictions += int((self.block_of[victims] >= 0).sum())
            self._drop(victims)
            k, v = self.store.read(missing, self.k.device)
            self.k[victims.to(self.k.device)], self.v[victims.to(self.k.device)] = k, v
            self.slot_of[missing], self.block_of[victims] = victims, missing
            self.last_use[victims] = self.clock
            slots = self.slot_of[wanted]
        return slots[inverse].view(blocks.shape)

    def write(self, blocks: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write through to the store and drop any cached copy of those blocks."""
        self.store.write(blocks, k, v)
        self.invalidate(blocks)

    def invalidate(self, blocks: torch.Tensor):
        """Forget the cached copies of ``blocks`` (rewritten in the store by the caller)."""
        cached = self.slot_of[blocks.cpu().long()]
        self._drop(cached[cached >= 0])

    def _victims(self, n: int) -> torch.Tensor:
        """The n least recently used slots (free slots count as never used); never this step's hits."""
        age = torch.where(self.block_of < 0, -1, self.last_use)
        age = torch.where(self.last_use == self.clock, torch.iinfo(torch.long).max, age)
        return age.topk(n, largest=False).indices

    def _drop(self, slots: torch.Tensor):
        held = self.block_of[slots]
        self.slot_of[held[held >= 0]] = -1
        self.block_of[slots] = -1
