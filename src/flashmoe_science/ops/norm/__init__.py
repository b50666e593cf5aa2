"""Fused LayerNorm forward (Triton, float32 statistics) for inference."""

from .api import layer_norm

__all__ = ["layer_norm"]
