"""Decoder models loaded from Hugging Face checkpoint directories."""
from .llama import ARCHITECTURES, BACKENDS, AttentionCall, ModelArgs, Transformer
from .loader import Model, load

__all__ = ["load", "Model", "ModelArgs", "Transformer", "AttentionCall", "ARCHITECTURES", "BACKENDS"]
