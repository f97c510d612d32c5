"""IID covariance: ``local_covariance`` and ``covariance_matching_loss``, per-class loop vs backends and compiled."""
import pytest

from _bench_util import config_params, provider_params, run_bench
from edfkern.bench.cases import op_modes


@pytest.mark.parametrize("config", config_params())
@pytest.mark.parametrize("mode", op_modes("local_covariance"))
@pytest.mark.parametrize("provider", provider_params())
def test_local_covariance(benchmark, provider, mode, config):
    run_bench(benchmark, "local_covariance", provider, mode, config)


@pytest.mark.parametrize("config", config_params())
@pytest.mark.parametrize("mode", op_modes("covariance_matching_loss"))
@pytest.mark.parametrize("provider", provider_params())
def test_covariance_matching_loss(benchmark, provider, mode, config):
    run_bench(benchmark, "covariance_matching_loss", provider, mode, config)
