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


def interpreted() -> bool:
    """Whether Triton kernels run through its CPU interpreter (TRITON_INTERPRET=1: the tests)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
