"""Grad-CAM (smoothgradcam++, ResNet-18 layer4 512x4x4, 4 noisy passes): per-image loop vs backends and compiled."""
from _bench_util import op_bench

test_grad_cam = op_bench("grad_cam")
