"""The old-versus-new table of one run_device.sh call: python summarize.py OUT."""
import csv
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
old = {}
legacy = out / "legacy.jsonl"
for line in legacy.read_text().splitlines() if legacy.exists() else []:
    r = json.loads(line)
    old[(r["shape"], r["seq_len"], r["impl"])] = r
rows = []
for path in sorted(out.glob("new_*/round_timing.csv")):
    rows += list(csv.DictReader(open(path)))
print("| shape | L | impl | 831e564 s (peak GiB) | lean s (peak GiB) | speedup |")
print("|---|---|---|---|---|---|")
for r in rows:
    o = old.get((r["shape"], int(r["seq_len"]), r["impl"]), {})
    def cell(median, peak, status):
        if status != "ok":
            return status or ""
        return f"{float(median):.3f} ({float(peak):.1f})" if peak not in (None, "") else f"{float(median):.3f}"
    speed = (f"{o['median_s'] / float(r['median_s']):.2f}x"
             if o.get("status") == "ok" and r.get("status") == "ok" else "")
    print(f"| {r['shape']} | {r['seq_len']} | {r['impl']} | "
          f"{cell(o.get('median_s'), o.get('peak_gib'), o.get('status'))} | "
          f"{cell(r.get('median_s'), r.get('peak_gib'), r.get('status'))} | {speed} |")
