from .attention import FlashMoEScienceAttention
from .block import FlashMoETransformerBlock
from .moe import FlashMoELayer
from .norm import FlashLayerNorm

__all__ = ["FlashLayerNorm", "FlashMoELayer", "FlashMoEScienceAttention", "FlashMoETransformerBlock"]
