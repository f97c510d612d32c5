"""CPD (EDF): ``cpd_trajectory_loss`` forward / backward / both, full-sort baseline vs backends and compiled."""
from _bench_util import op_bench

test_cpd_trajectory_loss = op_bench("cpd_trajectory_loss")
