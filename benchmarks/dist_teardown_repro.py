"""How often a finished gloo rank aborts in interpreter finalization (docs/distributed.md, "Ending a
launched script"): run the 3-rank world of one distributed test case N times and count the worlds
in which a rank exited abnormally.

    python benchmarks/dist_teardown_repro.py 14            # with exit_process (the repository's workers)
    EDFKERN_NO_NATIVE=1 python benchmarks/dist_teardown_repro.py 14

To see the abort rate without ``exit_process``, replace ``ED.exit_process(main())`` at the bottom of
tests/_dist_cases.py with ``raise SystemExit(main())`` (measured rates: benchmarks/NOTES.md, "Distributed
teardown").
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _dist_launch import run_world  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
bad = 0
for i in range(n):
    try:
        run_world(3, only="ops_match_one_process")
    except AssertionError as e:
        bad += 1
        print(f"world {i}: {str(e)[-300:]}", flush=True)
print(f"{bad} of {n} worlds had a rank exit abnormally")
