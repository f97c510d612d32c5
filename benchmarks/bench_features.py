"""IID class centralization and DM mean matching on flat features, loops vs backends and compiled."""
from _bench_util import op_bench

test_class_centralization_loss = op_bench("class_centralization_loss")
test_mean_matching_loss = op_bench("mean_matching_loss")
