"""Does the metagradient earn its cost? The distilled selection against the similarity
baselines, DSIR and perplexity correlations, and the ablations that swap its score out,
at the `presets.mid()` scale on CPU, over several corpus seeds and one narrower target.

    MGD_DATA_DIR=/work/shared/data python run.py [--corpus-seeds 0,1,2] \
        [--target-source EBM-NLP] [--all-docs 0,1,2] [--out runs/metagradient_share] >> run.log

Each run is `mgd run --config mid.toml` (this folder's `mid.toml`: `presets.mid()` as
TOML, all 13 methods, 3 seeds) with `--set corpus.seed=S`, plus one run with
`--target-source NAME` at corpus seed 0; with --all-docs SEEDS, those corpus seeds and the
target-source run again with every document of the files read (`corpus.max_docs=none`,
as `demo` reads them). The run folders stay
under --out (not committed); each run's results.csv and paired.csv are gathered into `results.csv` and
`paired.csv` here, and `table.md` puts them side by side: per run, each method's mean
eval loss +- std over seeds, and the paired difference to the distilled method with its
95% interval and verdict (`pipeline/paired.py`).
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from mgd.pipeline import presets
from mgd.pipeline.config import ABLATIONS, METHODS, OURS, to_toml
from mgd.pipeline.paired import AHEAD, BEHIND, NOT_SEPARATED, paired_interval
from mgd.pipeline.report import summarize

HERE = Path(__file__).resolve().parent


def write_config(path: Path) -> None:
    """`presets.mid()` with every method, as the --config file of every run."""
    cfg = presets.mid()
    cfg = cfg.replace(selection=dataclasses.replace(cfg.selection, methods=METHODS))
    path.write_text(to_toml(cfg))


def run_one(label: str, out: Path, extra: list[str]) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "mgd.cli", "run", "--config", str(HERE / "mid.toml"),
           "--out", str(out), "--no-progress", *extra]
    print(f"[{label}] {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(HERE / f"{label}.log", "a") as log:  # a resumed run adds to its log
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.time() - start
    print(f"[{label}] exit {rc} after {elapsed:.0f} s", flush=True)
    return elapsed, rc


def table(results: pd.DataFrame, paired: pd.DataFrame) -> str:
    lines = []
    for label, df in results.groupby("run", sort=False):
        s = summarize(df)
        p = paired[paired["run"] == label].set_index("method")
        named = df["eval_set"].dropna() if "eval_set" in df else pd.Series(dtype=object)
        eval_set = named.iloc[0] if len(named) else "held-out on-target set"
        lines += [f"### {label} (evaluation: {eval_set})", "",
                  "| method | eval loss mean +- std | on-target / corrupt share | distilled - method "
                  "[95% interval] | verdict |", "|---|---|---|---|---|"]
        order = [m for m in s.index if m not in ABLATIONS] + [m for m in ABLATIONS if m in s.index]
        for m in order:
            r = s.loc[m]
            name = f"{m} (ablation)" if m in ABLATIONS else m
            share = f"{r['ontarget_share']:.2f} / {r['corrupt_share']:.2f}"
            if m == OURS or m not in p.index:
                diff, verdict = "", ""
            else:
                q = p.loc[m]
                diff = f"{q['diff_mean']:+.4f} [{q['diff_low']:+.4f}, {q['diff_high']:+.4f}]"
                verdict = q["verdict"]
            lines.append(f"| {name} | {r['eval_loss_mean']:.4f} +- {r['eval_loss_std']:.4f} | "
                         f"{share} | {diff} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def across_runs(results: pd.DataFrame, paired: pd.DataFrame, labels: list[str]) -> str:
    """For the default-target runs: each method's verdicts over the runs; the paired
    differences of all (corpus seed, training seed) pairs pooled into one interval, which
    treats the pairs as independent (they are not within a corpus seed: one base model,
    one scorer), so it is too narrow; and the interval over the runs' mean differences
    (one number per corpus seed), the conservative one."""
    r = results[results["run"].isin(labels)]
    p = paired[paired["run"].isin(labels)]
    wide = r.pivot_table(index=["run", "seed"], columns="method", values="eval_loss")
    lines = [f"### Across {', '.join(labels)}", "",
             "| method | ahead / not separated / behind (per run) | pooled distilled - method "
             "[95% interval], n pairs | over runs' means [95% interval], n runs |",
             "|---|---|---|---|"]
    for m in p.groupby("method")["diff_mean"].mean().sort_values().index:
        v = p[p["method"] == m]["verdict"].value_counts()
        d = (wide[OURS] - wide[m]).dropna().to_numpy()
        mean, low, high = paired_interval(d)
        runs = p[p["method"] == m]["diff_mean"].to_numpy()
        r_mean, r_low, r_high = paired_interval(runs)
        lines.append(f"| {m} | {v.get(AHEAD, 0)} / {v.get(NOT_SEPARATED, 0)} / {v.get(BEHIND, 0)} | "
                     f"{mean:+.4f} [{low:+.4f}, {high:+.4f}], {len(d)} | "
                     f"{r_mean:+.4f} [{r_low:+.4f}, {r_high:+.4f}], {len(runs)} |")
    return "\n".join(lines + [""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-seeds", default="0,1,2")
    ap.add_argument("--target-source", default="EBM-NLP")
    ap.add_argument("--out", default="runs/metagradient_share")
    ap.add_argument("--all-docs", default="",
                    help="corpus seeds to run again with corpus.max_docs=none, and the "
                         "target-source run with it at seed 0 (e.g. 0,1,2; default none)")
    args = ap.parse_args()
    write_config(HERE / "mid.toml")
    out = Path(args.out)
    runs = [(f"corpus_seed{s}", ["--set", f"corpus.seed={s}"])
            for s in (int(x) for x in args.corpus_seeds.split(",") if x.strip())]
    if args.target_source:
        runs.append((f"target_{args.target_source}_seed0",
                     ["--target-source", args.target_source, "--set", "corpus.seed=0"]))
    if args.all_docs:
        # mid() reads the first 2000 documents of each file, and the on-target file lists
        # its sources one after another: only the first source ever enters the corpus.
        every = ["--set", "corpus.max_docs=none"]
        runs += [(f"alldocs_corpus_seed{s}", ["--set", f"corpus.seed={s}", *every])
                 for s in (int(x) for x in args.all_docs.split(",") if x.strip())]
        if args.target_source:
            runs.append((f"alldocs_target_{args.target_source}_seed0",
                         ["--target-source", args.target_source, "--set", "corpus.seed=0", *every]))
    results, paired = [], []
    for label, extra in runs:
        _, rc = run_one(label, out / label, extra)
        if rc != 0:
            continue
        r = pd.read_csv(out / label / "results.csv")
        p = pd.read_csv(out / label / "paired.csv")
        r.insert(0, "run", label)
        p.insert(0, "run", label)
        results.append(r)
        paired.append(p)
        # Written after every run so a run cut short still leaves the finished ones.
        all_r, all_p = pd.concat(results), pd.concat(paired)
        all_r.to_csv(HERE / "results.csv", index=False)
        all_p.to_csv(HERE / "paired.csv", index=False)
        text = table(all_r, all_p)
        for prefix in ("corpus_seed", "alldocs_corpus_seed"):
            group = [lab for lab in all_r["run"].unique() if lab.startswith(prefix)]
            if len(group) > 1:
                text += "\n" + across_runs(all_r, all_p, group)
        (HERE / "table.md").write_text(text)


if __name__ == "__main__":
    main()
