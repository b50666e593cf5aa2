"""Framework adapters (lazy: importing this package imports no framework).

- ``flashmoe_science.integrations.transformers``: ``apply(model)`` / ``undo(model)`` for Hugging Face
  transformers 5.x (attention + sparse-MoE blocks).
- ``flashmoe_science.integrations.torchtitan``: attention and grouped-experts modules for TorchTitan.
- ``flashmoe_science.integrations.megatron``: ModuleSpec submodules for Megatron-Core.

Each submodule imports its framework on first use; see docs/integrations.md.
"""

__all__ = ["megatron", "torchtitan", "transformers"]
