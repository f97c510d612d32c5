"""The tier can fail: bugs seeded into a temporary copy of csrc (the flat-features family and the
block reduction it shares) each make a contract case fail, where the unchanged copy passes; an
off-by-one read past a workspace also fails the sanitizer pass, which names it."""
from __future__ import annotations

import shutil

import pytest
import torch

import test_kernel_contract as contract
from shim_build import CSRC, build
from shim_kernels import ShimError, ShimKernels
from test_cuda_on_cpu_sanitized import CONTRACT, run_under_asan

pytestmark = pytest.mark.cuda_on_cpu

# (file, the text, its replacement, what the failure says)
BUGS = {
    "missing __syncthreads": ("cuda/common.cuh", "  if (lane == 0) sh[warp] = v;\n  __syncthreads();\n",
                              "  if (lane == 0) sh[warp] = v;\n", ""),
    "shuffle tree from 8": ("cuda/common.cuh", "for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(",
                            "for (int o = 8; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(", ""),
    "partial shuffle mask": ("cuda/common.cuh", "__shfl_xor_sync(0xffffffffu, v, o)",
                             "__shfl_xor_sync(0x0000ffffu, v, o)", "mask"),
    "barrier in divergent code": ("cuda/features.cu", "  s = block_reduce(s, Sum{}, 0.0);",
                                  "  if (threadIdx.x < 512) s = block_reduce(s, Sum{}, 0.0);", "barrier"),
    "wrong index": ("cuda/features.cu", "out[i * D + e] = cast_to<T>(", "out[j * D + e] = cast_to<T>(", ""),
    "2048 threads per block": ("cuda/features.cu", "total_kernel<A><<<1, 1024,", "total_kernel<A><<<1, 2048,",
                               "cudaErrorInvalidConfiguration"),
}


def _features(csrc) -> ShimKernels:
    return ShimKernels(build("plain", csrc=csrc, families=("features",)), orders=("forward", "reverse"))


def _check(K: ShimKernels) -> None:
    contract.test_flat_features(K, torch.float32, (13, 70, 5, "labels"))


@pytest.fixture(scope="module")
def csrc_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("csrc")
    for sub in ("cuda", "include"):
        shutil.copytree(CSRC / sub, root / sub)
    return root


def test_unchanged_copy_passes(csrc_copy):
    _check(_features(csrc_copy))


@pytest.mark.parametrize("bug", list(BUGS))
def test_seeded_bug_fails(csrc_copy, tmp_path, bug):
    path, old, new, says = BUGS[bug]
    mutant = tmp_path / "csrc"
    shutil.copytree(csrc_copy, mutant)
    text = (mutant / path).read_text()
    assert old in text, f"{bug}: the text to change is no longer in csrc/{path}"
    (mutant / path).write_text(text.replace(old, new, 1))
    with pytest.raises((AssertionError, ShimError)) as err:
        _check(_features(mutant))
    assert says in str(err.value), f"{bug}: {err.value}"


def test_off_by_one_read_fails_under_asan(csrc_copy, tmp_path):
    """``total_kernel`` reading ``part[n]``, one double past the workspace: the plain build sees it only
    as results that change with the run order; the sanitizer pass exits 86 naming the overflow."""
    mutant = tmp_path / "csrc"
    shutil.copytree(csrc_copy, mutant)
    path = mutant / "cuda/features.cu"
    old = "for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += part[i];"
    assert old in path.read_text(), "the text to change is no longer in csrc/cuda/features.cu"
    path.write_text(path.read_text().replace(old, old.replace("i < n", "i <= n"), 1))
    res = run_under_asan([str(CONTRACT), "-k", "test_flat_features and float64"], csrc=mutant)
    assert res.returncode == 86, f"exit {res.returncode}, not ASan's 86:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "heap-buffer-overflow" in res.stderr, res.stderr[-3000:]
