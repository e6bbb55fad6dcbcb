from .api import dense_attention, hip_attention
from .mask import HiPMask, empty_mask
from .rope import RoPE

__all__ = ["hip_attention", "dense_attention", "empty_mask", "HiPMask", "RoPE"]
