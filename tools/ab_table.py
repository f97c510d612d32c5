"""The table of tools/ab_bench.sh: per op and mode, each round's median before (A) and after (B), and the
ratio of the medians over rounds. usage: python tools/ab_table.py OUTDIR [ROUNDS, e.g. 1,2]
Reads the files as ab_bench.sh names them (A-1.json, B-1.json) or as committed (...-before-round1.json)."""
import json, glob, re, statistics, sys
d = sys.argv[1]; rounds = sys.argv[2].split(",") if len(sys.argv) > 2 else None
rows = {}
for f in sorted(glob.glob(f"{d}/*.json")):
    m = re.search(r"(A|B|before|after)-(?:round)?(\d+)\.json$", f)
    if not m: continue
    side, r = {"before": "A", "after": "B"}.get(m[1], m[1]), m[2]
    if rounds and r not in rounds: continue
    for x in json.load(open(f))["results"]:
        if x.get("status") == "ok":
            rows.setdefault((x["op"], x["mode"]), {}).setdefault(side, []).append(x["median"] * 1e3)
print("| op | mode | before (ms), per round | after (ms), per round | after/before (median of rounds) |")
print("|---|---|---|---|---|")
for (op, mode), v in rows.items():
    a, b = v.get("A", []), v.get("B", [])
    if a and b:
        ratio = statistics.median(b) / statistics.median(a)
        print(f"| {op} | {mode} | {', '.join(f'{t:.2f}' for t in a)} | {', '.join(f'{t:.2f}' for t in b)} | {ratio:.2f} |")
