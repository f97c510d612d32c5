"""GPU proof for edfkern: an sm_90 compile check that runs without a GPU, and the one
prepared validation run for a lent H100/H200 (see docs/gpu.md).

* :mod:`.capture`: the Triton specialisations the launchers choose at the named configs;
* :mod:`.sm90`: compile them (and csrc/cuda/*.cu) for sm_90, registers / spills / shared memory;
* :mod:`.validate`: the timed steps of ``benchmarks/gpu/validate.sh`` and their ``--dry-run``;
* :mod:`.driver`: every native kernel at small odd shapes (compute-sanitizer's workload).

Developer tooling: it lives in the repository's ``tools/`` folder, reads the repository's tests
and ``csrc/``, and is not installed with the package. Entry point, from the repository root:
``python -m tools.gpucheck --help``.
"""
from pathlib import Path

#: The repository root: the tools' subprocesses run there and find ``tests/`` and ``csrc/`` in it.
REPO = Path(__file__).resolve().parents[2]
