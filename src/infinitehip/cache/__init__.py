"""KV caches: the on-device cache of fixed capacity (``kv``) and offload building blocks (``offload``)."""
from .kv import CapacityError, KVCache, kv_bytes, plan_kv_cache

__all__ = ["KVCache", "CapacityError", "kv_bytes", "plan_kv_cache"]
