"""Developer tooling run from a checkout of the repository (never installed with the package).

Run from the repository root, e.g. ``python -m tools.gpucheck --help``.
"""
