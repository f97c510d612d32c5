"""IID covariance: ``local_covariance`` and ``covariance_matching_loss``, per-class loop vs backends and compiled."""
from _bench_util import op_bench

test_local_covariance = op_bench("local_covariance")
test_covariance_matching_loss = op_bench("covariance_matching_loss")
