"""Expert parallelism over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

``ExpertParallelMoE`` shards a :class:`~flashmoe_science.nn.FlashMoELayer`'s experts over an
expert-parallel process group and moves tokens with ``all_to_all_single``; see
``docs/distributed.md``.
"""

from .comm import all_gather_rows, all_to_all
from .expert_parallel import ExpertParallelMoE, new_ep_dp_groups

__all__ = ["ExpertParallelMoE", "all_gather_rows", "all_to_all", "new_ep_dp_groups"]
