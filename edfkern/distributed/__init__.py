"""Scale-out on ``torch.distributed``: the answer one process would give, from rows spread over ranks.

Start processes with ``torchrun`` (NCCL on GPUs, gloo on CPUs) and pass a process group to the ops::

    import torch.distributed as dist, edfkern
    dist.init_process_group("gloo")                       # or "nccl"
    pg = dist.group.WORLD
    loss = edfkern.distributed.covariance_matching_loss(syn, real, syn_groups=ys, real_groups=yr,
                                                        process_group=pg)

``edfkern.<op>(..., process_group=pg)`` forwards to the functions here when ``pg`` is an initialised
group; ``process_group=None`` is the single-process op. Called directly with an inactive group, the
functions here run the same multi-rank algorithm on this process's rows alone. This package sits
below :mod:`edfkern.ops`: it imports no op module, and the backward formulas it shares with the ops
live in :mod:`edfkern._grads`. See ``docs/distributed.md`` for the layouts and the costs.

Modules, top-down:

- :mod:`._comm`: the only module that calls ``torch.distributed`` (timeouts, one buffer per dtype,
  byte accounting, class sharding);
- :mod:`._agree`: the header every op call exchanges first (the op's identity, a per-group call
  counter, whether this rank's own checks failed, and the op's shapes and arguments), so that bad
  input on any rank raises on every rank and the ranks never pair different calls;
- :mod:`.stats`: the stable merge of per-class statistics (sums and counts, then the scatter about
  the global mean) and :func:`reduce_class_stats`;
- :mod:`.features`: row-sharded ``local_covariance``, ``covariance_matching_loss``,
  ``class_centralization_loss``, ``mean_matching_loss``;
- :mod:`.cpd`: distributed CPD by an all-reduced radix select.
"""
from ._comm import (CommStats, all_reduce_sum_, default_group, last_call_stats, record, shard_classes,
                    shutdown, exit_process, world)
from .cpd import cpd_keep_mask, cpd_trajectory_loss
from .features import class_centralization_loss, covariance_matching_loss, local_covariance, mean_matching_loss
from .stats import reduce_class_stats

__all__ = [
    "shard_classes", "default_group", "world", "all_reduce_sum_", "reduce_class_stats",
    "local_covariance", "covariance_matching_loss", "class_centralization_loss", "mean_matching_loss",
    "cpd_trajectory_loss", "cpd_keep_mask", "last_call_stats", "record", "CommStats", "shutdown", "exit_process",
]
