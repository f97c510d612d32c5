"""``python -m tools.gpucheck``: GPU validation without a GPU at hand, and with one.

    python -m tools.gpucheck [validate] [--dry-run] [--out DIR] [--steps a,b]
        the prepared GPU run (benchmarks/gpu/validate.sh calls this); --dry-run on CPU
    python -m tools.gpucheck compile-sm90 [--json PATH] [--configs a,b] [--jobs N]
        compile every Triton specialisation and CUDA kernel for sm_90, report registers,
        spills and shared memory; exit 1 on a compile error, a spill or too much shared memory

Run from the repository root (the tools are not part of the installed package).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

from . import REPO


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.gpucheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    v = sub.add_parser("validate", help="the prepared GPU run (default command)")
    v.add_argument("--dry-run", action="store_true", help="CPU: CUDA steps skipped, the rest at tiny sizes")
    v.add_argument("--out", default=os.environ.get("OUT") or "gpucheck-out", help="results folder (default $OUT)")
    v.add_argument("--steps", help="comma-separated subset of the steps (to rerun failed ones)")
    c = sub.add_parser("compile-sm90", help="compile every GPU kernel for sm_90 and check resources")
    c.add_argument("--json", metavar="PATH")
    c.add_argument("--configs", help="comma-separated named configs to capture at (default: all)")
    c.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: cores)")
    c.add_argument("--triton-only", action="store_true")
    c.add_argument("--cuda-only", action="store_true")
    c.add_argument("--no-variants", action="store_true", help="skip the tf32 / tf32x3 tl.dot variants")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "validate")
    args = _parser().parse_args(argv)
    if args.cmd == "compile-sm90":
        if os.environ.get("TRITON_INTERPRET") == "1":  # kernels must be compiled-mode JITFunctions
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            return subprocess.call([sys.executable, "-m", "tools.gpucheck", *argv], env=env, cwd=REPO)
        from .sm90 import compile_sm90

        return compile_sm90(args.json, args.configs.split(",") if args.configs else None, args.jobs,
                            args.triton_only, args.cuda_only, not args.no_variants)
    from .validate import validate

    return validate(args.out, args.dry_run, args.steps.split(",") if args.steps else None)


if __name__ == "__main__":
    sys.exit(main())
