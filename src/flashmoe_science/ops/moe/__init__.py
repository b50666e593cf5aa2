from .api import fused_experts, fused_moe, route

__all__ = ["fused_experts", "fused_moe", "route"]
