from .attention import FlashMoEScienceAttention
from .block import FlashMoETransformerBlock
from .moe import FlashMoELayer

__all__ = ["FlashMoELayer", "FlashMoEScienceAttention", "FlashMoETransformerBlock"]
