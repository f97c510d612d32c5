"""Scale-out on ``torch.distributed`` (work in progress: the collectives layer).

See :mod:`edfkern.distributed._comm` for the rules every collective follows.
"""
from ._comm import all_reduce_sum_, default_group, shard_classes, world

__all__ = ["shard_classes", "all_reduce_sum_", "default_group", "world"]
