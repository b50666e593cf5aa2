from .api import flash_attention_science, flash_attention_varlen

__all__ = ["flash_attention_science", "flash_attention_varlen"]
