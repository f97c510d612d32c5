"""IID class centralization and DM mean matching on flat features, loops vs backends and compiled."""
import pytest

from _bench_util import config_params, provider_params, run_bench
from edfkern.bench.cases import op_modes


@pytest.mark.parametrize("config", config_params())
@pytest.mark.parametrize("mode", op_modes("class_centralization_loss"))
@pytest.mark.parametrize("provider", provider_params())
def test_class_centralization_loss(benchmark, provider, mode, config):
    run_bench(benchmark, "class_centralization_loss", provider, mode, config)


@pytest.mark.parametrize("config", config_params())
@pytest.mark.parametrize("mode", op_modes("mean_matching_loss"))
@pytest.mark.parametrize("provider", provider_params())
def test_mean_matching_loss(benchmark, provider, mode, config):
    run_bench(benchmark, "mean_matching_loss", provider, mode, config)
