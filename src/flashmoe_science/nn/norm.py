"""``FlashLayerNorm``: ``nn.LayerNorm`` with the library's fused kernel on CUDA.

A subclass: same constructor, parameters and state dict as ``nn.LayerNorm`` (checkpoints
move both ways). Normalising over the last dim with affine weights in the input's dtype it
calls :func:`flashmoe_science.ops.norm.layer_norm` (the fused kernel in inference on CUDA,
PyTorch's kernels when a gradient is needed); any other configuration falls back to
``nn.LayerNorm.forward``. Under ``torch.autocast`` PyTorch runs LayerNorm in float32 and
returns float32; the fused path (inference, half-precision weights) returns the input's
dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import layer_norm


class FlashLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1 and self.weight is not None and x.dtype == self.weight.dtype:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


__all__ = ["FlashLayerNorm"]
