"""Triton kernels for InfiniteHiP. Each mirrors a function of ``attention/reference.py``."""


def available() -> bool:
    """Whether the Triton backend can run here (triton importable and a CUDA device present)."""
    try:
        import torch
        import triton  # noqa: F401

        from . import ops  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
