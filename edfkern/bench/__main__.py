"""Entry point: ``python -m edfkern.bench --help`` (per-op tables) and
``python -m edfkern.bench --step dm-iid|mtt-edf --help`` (whole-iteration profiles, :mod:`.steps`)."""
import sys


def _run() -> int:
    argv = sys.argv[1:]
    if any(a == "--step" or a.startswith("--step=") for a in argv):
        from .steps import main as steps_main
        return steps_main(argv)
    from .cli import main
    return main()


if __name__ == "__main__":
    sys.exit(_run())
