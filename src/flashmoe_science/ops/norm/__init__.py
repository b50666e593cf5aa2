"""Fused LayerNorm (Triton forward and backward, float32 statistics)."""

from .api import layer_norm

__all__ = ["layer_norm"]
