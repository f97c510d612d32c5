"""``python -m edfkern.build``: compile the native extension now (``--force``: from scratch).

The build configuration is :mod:`edfkern.build`; the cached just-in-time build it runs is
:mod:`edfkern._extension`'s.
"""
from __future__ import annotations

import sys
from typing import Optional

from edfkern import _extension
from edfkern.build import __doc__ as _BUILD_DOC


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edfkern.build", description=_BUILD_DOC.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="delete the cached build and compile again")
    ap.add_argument("--verbose", action="store_true", help="show the compiler output")
    args = ap.parse_args(argv)
    if args.force:
        try:
            _extension.clear_cache()
        except _extension.CacheError as e:
            print(f"edfkern: cannot clear the cached build: {e}", file=sys.stderr)
            return 1
    mod, why = _extension.load(verbose=args.verbose)
    if mod is None:
        print(f"edfkern: native extension not built: {why}", file=sys.stderr)
        return 1
    print(f"edfkern: native extension ready ({'CPU + CUDA' if mod.with_cuda() else 'CPU only'}): {mod.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
