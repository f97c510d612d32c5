"""DAE (EDF): ``dae_`` and ``dae_sgd_step_``, loop baseline vs backends and compiled, per config."""
import pytest

from _bench_util import config_params, provider_params, run_bench
from edfkern.bench.cases import op_modes


@pytest.mark.parametrize("config", config_params())
@pytest.mark.parametrize("mode", op_modes("dae_"))
@pytest.mark.parametrize("provider", provider_params())
def test_dae_(benchmark, provider, mode, config):
    run_bench(benchmark, "dae_", provider, mode, config)


@pytest.mark.parametrize("config", config_params())
@pytest.mark.parametrize("mode", op_modes("dae_sgd_step_"))
@pytest.mark.parametrize("provider", provider_params())
def test_dae_sgd_step_(benchmark, provider, mode, config):
    run_bench(benchmark, "dae_sgd_step_", provider, mode, config)
