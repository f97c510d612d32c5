"""CPD (EDF): ``cpd_trajectory_loss`` forward / backward / both, full-sort baseline vs backends and compiled."""
import pytest

from _bench_util import config_params, provider_params, run_bench
from edfkern.bench.cases import op_modes


@pytest.mark.parametrize("config", config_params())
@pytest.mark.parametrize("mode", op_modes("cpd_trajectory_loss"))
@pytest.mark.parametrize("provider", provider_params())
def test_cpd_trajectory_loss(benchmark, provider, mode, config):
    run_bench(benchmark, "cpd_trajectory_loss", provider, mode, config)
