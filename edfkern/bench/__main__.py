"""Entry point: ``python -m edfkern.bench --help`` (per-op tables, and ``--step`` whole iterations)."""
import sys


def _run() -> int:
    from .cli import main
    return main()


if __name__ == "__main__":
    sys.exit(_run())
