"""KV offloading building block: the host KV store (optionally FP8).

The full cache of a layer lives in host memory (pinned when CUDA is present: plain page-locked
memory, never CUDA managed memory, which can hang the GPU when oversubscribed), read in place by
the kernels through a device alias, or through the GPU page cache (``gpu_pages.py``). A store can
also be allocated whole in GPU memory (``on_device``, same format): a layer kept there is read
in place like the on-device cache.
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
# One round trip: a decode-written page is re-encoded from its rounded values whenever its
# maximum grows, and its error can add up past this (docs/offload.md, "Exactness").
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
    ``dk``/``dv`` are device aliases of it: reads and writes are GPU kernels over mapped host
    memory, never a CPU-side copy. FP8 scales (one float per page and kv head) live in device
    memory (``dk_scale``/``dv_scale``, no host copy): a probe over PCIe then reads its key's bytes
    alone, not a 4-byte scale as well, in a transfer of its own. Without a device (or on
    CPU) the aliases are the host tensors themselves. ``on_device``: allocate the whole store
    in ``device`` memory instead (same format; ``k`` and ``dk`` are then the same tensor).

    ``probe_stride`` s > 0 (a host store): ``dk_probe`` (ceil(num_blocks * block / s) + 1, K, D)
    in device memory holds the key codes at every global token position that is a multiple of s
    (row g // s), which the pruning kernel reads instead of host memory (``attention/pages.py``):
    the first pruning stage's first levels probe only there (the middles of a 256-key chunk's
    halves, quarters and eighths are multiples of 16), and with ``HiPConfig.stage0_levels`` every
    probe of that stage does. Every write keeps it current (``sync_probes``, ``probe_rows``); its
    last row is a dump that static-shape writes of the other tokens land in, never read.
    """

    def __init__(self, num_blocks: int, block: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, fp8: bool = False, device: torch.device | str | None = None,
                 on_device: bool = False, probe_stride: int = 0):
        device = None if device is None else torch.device(device)
        shape = (num_blocks, block, kv_heads, head_dim)
        self.dtype, self.fp8, self.on_device = dtype, fp8, on_device
        self.k, self.dk = _allocate(shape, FP8 if fp8 else dtype, device, on_device)
        self.v, self.dv = _allocate(shape, FP8 if fp8 else dtype, device, on_device)
        if fp8:   # in device memory always: 1/32 of the codes' bytes (D = 128), read with every probe
            # An empty page holds what fp8_encode makes of zeros (the scale's floor), so every page
            # is an encoder's output: the decode write relies on it (kv_write._append).
            tiny = torch.finfo(torch.float32).tiny
            self.dk_scale = torch.full((num_blocks, 1, kv_heads, 1), tiny, dtype=torch.float32, device=device)
            self.dv_scale = torch.full_like(self.dk_scale, tiny)
        self.probe_stride = 0 if on_device else probe_stride
        self.dk_probe = None
        if self.probe_stride:
            rows = -(-num_blocks * block // self.probe_stride)
            self.dk_probe = torch.zeros((rows + 1, kv_heads, head_dim), dtype=self.dk.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.host_nbytes + self.device_nbytes

    @property
    def host_nbytes(self) -> int:
        """Bytes in host memory: the codes, unless the whole store is on the device."""
        return 0 if self.on_device else self.k.nbytes + self.v.nbytes

    @property
    def device_nbytes(self) -> int:
        """Bytes in device memory: the FP8 scales, and the codes too for a store on the device."""
        scales = 2 * self.dk_scale.nbytes if self.fp8 else 0
        probes = self.dk_probe.nbytes if self.dk_probe is not None else 0
        return scales + probes + (self.k.nbytes + self.v.nbytes if self.on_device else 0)

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
        self.sync_probes(blocks)

    def probe_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The probe-copy row of each global token row (any shape): its row where the token is at
        a multiple of the stride, else the dump row."""
        s = self.probe_stride
        return torch.where(tokens % s == 0, tokens // s, self.dk_probe.shape[0] - 1)

    def sync_probes(self, blocks: torch.Tensor):
        """Copy into ``dk_probe`` the store's keys at the probe positions of ``blocks`` (N,), after
        they were written. Static shapes (no host sync): a block shorter than the stride
        contributes the last probe position at or before its start, which may lie in an earlier
        block and is then rewritten with the value it has."""
        if self.dk_probe is None:
            return
        s, block = self.probe_stride, self.dk.shape[1]
        dev = self.dk_probe.device
        pos = blocks.to(dev)[:, None] * block + torch.arange(0, max(block, s), s, device=dev)   # (N, n)
        pos = (pos // s * s).flatten()
        self.dk_probe[pos // s] = self.dk.view(-1, *self.dk.shape[2:])[pos.to(self.dk.device)].to(dev)

    def raw(self, blocks: torch.Tensor) -> list[torch.Tensor]:
        """Device copies of ``blocks``' stored bytes (codes; FP8 scales too), for ``put_raw``."""
        b = blocks.to(self.dk.device)
        return [self.dk[b], self.dv[b]] + ([self.dk_scale[b], self.dv_scale[b]] if self.fp8 else [])

    def put_raw(self, blocks: torch.Tensor, parts: list[torch.Tensor]):
        """Store ``raw``'s bytes at ``blocks``, unchanged (no FP8 re-encode), and their probes.
        Through the device alias, in stream order with the kernels that read and write the store."""
        b = blocks.to(self.dk.device)
        self.dk[b], self.dv[b] = parts[0], parts[1]
        if self.fp8:
            self.dk_scale[b], self.dv_scale[b] = parts[2], parts[3]
        self.sync_probes(b)

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
