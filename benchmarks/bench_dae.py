"""DAE (EDF): ``dae_`` and ``dae_sgd_step_``, loop baseline vs backends and compiled, per config."""
from _bench_util import op_bench

test_dae_ = op_bench("dae_")
test_dae_sgd_step_ = op_bench("dae_sgd_step_")
