"""infinitehip: million-token inference on one GPU with InfiniteHiP sparse attention."""
from .attention import HiPMask, RoPE, hip_attention
from .config import PRESETS, HiPConfig
from .engine import generate
from .models import load

__version__ = "0.1.0"
__all__ = ["HiPConfig", "PRESETS", "HiPMask", "RoPE", "hip_attention", "load", "generate", "__version__"]
