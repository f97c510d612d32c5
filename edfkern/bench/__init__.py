"""Benchmarks and memory profiles for edfkern: ``python -m edfkern.bench``.

* :mod:`.configs`: the docs/benchmarks.md configs by name, and how they scale down.
* :mod:`.cases`: one setup factory per op, keyed by provider and mode (the CLI and the
  pytest-benchmark suites in ``benchmarks/`` both use it), with each op's bytes and FLOPs.
* :mod:`.compiled`: the ``compiled`` provider, ``torch.compile`` of each op's plain PyTorch formula.
* :mod:`.ceilings`: measured streaming bandwidth (also at each op's own size) and fp32 matmul rate,
  and the rule that keeps every achieved fraction at or below 100%.
* :mod:`.memory`: workspace (peak above inputs/outputs/grads), CUDA or peak RSS in a child.
* :mod:`.runner`, :mod:`.report`, :mod:`.cli`: timing loop, tables/JSON/plot, command line.
"""
from .cases import MODES, OPS, Case, Unavailable, make_case, op_modes, providers
from .configs import CONFIGS, DEFAULT_CONFIG, Config, get_config

__all__ = ["MODES", "OPS", "Case", "Unavailable", "make_case", "op_modes", "providers", "CONFIGS",
           "DEFAULT_CONFIG", "Config", "get_config"]
