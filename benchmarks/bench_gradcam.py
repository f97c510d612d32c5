"""Grad-CAM (smoothgradcam++, ResNet-18 layer4 512x4x4, 4 noisy passes): per-image loop vs backends and compiled."""
import pytest

from _bench_util import config_params, provider_params, run_bench
from edfkern.bench.cases import op_modes


@pytest.mark.parametrize("config", config_params())
@pytest.mark.parametrize("mode", op_modes("grad_cam"))
@pytest.mark.parametrize("provider", provider_params())
def test_grad_cam(benchmark, provider, mode, config):
    run_bench(benchmark, "grad_cam", provider, mode, config)
