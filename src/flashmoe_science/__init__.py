"""FlashMoE-Science: fused attention and fused Mixture-of-Experts for scientific AI.

CUDA float16/bfloat16 tensors run Triton kernels tuned for Hopper; everything else runs a
plain-PyTorch reference path. ``FLASHMOE_BACKEND=reference|triton`` forces a path.
"""

from .nn import FlashMoELayer, FlashMoEScienceAttention, FlashMoETransformerBlock
from .ops.attention import flash_attention_science, flash_attention_varlen
from .ops.moe import fused_experts, fused_moe, route

__version__ = "0.1.0"

__all__ = [
    "FlashMoELayer",
    "FlashMoEScienceAttention",
    "FlashMoETransformerBlock",
    "flash_attention_science",
    "flash_attention_varlen",
    "fused_experts",
    "fused_moe",
    "route",
]
