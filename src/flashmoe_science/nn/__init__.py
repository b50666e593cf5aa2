from .attention import FlashMoEScienceAttention
from .moe import FlashMoELayer

__all__ = ["FlashMoELayer", "FlashMoEScienceAttention"]
