"""Turn saved benchmark runs into a markdown report and plots.

    python bench/report.py RUN.json [RUN2.json ...] --out DIR [--reference xla,pallas,triton]

RUN is what `pytest bench --benchmark-json PATH` or `--benchmark-save/-autosave`
wrote (out-of-memory points are under its "mgd_oom" key), or the JSONL log of
$MGD_BENCH_JSONL (one result per line, useful when a run was cut short).

DIR receives report.md (one table for the kernels, one for the metagradient
round), results.csv, and per stage and configuration one figure with three
panels: effective TFLOP/s against T per implementation, speedup over the
fastest reference implementation at each T, and memory against T with the
out-of-memory points marked.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

KERNEL_STAGES = ("forward", "backward", "double_backward", "hvp")
E2E_STAGE = "metagradient_round"
DEFAULT_REFERENCE = ("xla", "pallas", "triton")
IMPL_ORDER = ("xla", "pallas", "triton", "cuda", "standin")
# The end-to-end round with attention replaced by a near-free function of the same shapes.
STANDIN = "standin"
CONFIG_KEYS = ("B", "H", "D", "causal", "dtype")
MiB = 2.0 ** 20


# ------------------------------------------------------------------ loading

def _entries(path):
    """(benchmark entries, out-of-memory entries) of one saved run."""
    text = Path(path).read_text(encoding="utf8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return ([r for r in records if r.get("stats")],
                [r for r in records if not r.get("stats")])
    data = json.loads(text)
    if "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
    return data["benchmarks"], data.get("mgd_oom", [])


def _row(entry, run, oom):
    info = dict(entry.get("extra_info") or {})
    stats = entry.get("stats") or {}
    median = stats.get("median") if not oom else None
    flops = info.get("flops")
    memory = info.get("compiled_bytes") or info.get("peak_bytes_in_use")
    return {
        "run": run, "name": entry.get("name"), "stage": info.get("stage"),
        "impl": info.get("impl"), "shape": info.get("shape"),
        "B": info.get("B"), "T": info.get("T"), "H": info.get("H"), "D": info.get("D"),
        "causal": info.get("causal"), "dtype": info.get("dtype"),
        "median_ms": median * 1e3 if median else math.nan,
        "iqr_ms": stats.get("iqr", math.nan) * 1e3 if median else math.nan,
        "rounds": stats.get("rounds"),
        "tflops": flops / median / 1e12 if (median and flops) else math.nan,
        "bytes_moved": info.get("bytes_moved"),
        "memory_mib": memory / MiB if memory else math.nan,
        "peak_mib": info["peak_bytes_in_use"] / MiB if info.get("peak_bytes_in_use") else math.nan,
        "oom": bool(oom or info.get("oom")),
        # "yes": it ran out; "T>=N": not attempted, out of memory at the shorter T=N.
        "oom_note": (f"T>={info['oom_inferred_from_T']}" if info.get("oom_inferred_from_T")
                     else "yes" if (oom or info.get("oom")) else ""),
        "gpu": info.get("gpu"), "commit": (info.get("commit") or "")[:10],
    }


def load(paths):
    rows = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"saved run not found: {path}")
        benches, ooms = _entries(path)
        run = path.stem
        rows += [_row(b, run, oom=False) for b in benches if (b.get("extra_info") or {}).get("stage")]
        rows += [_row(o, run, oom=True) for o in ooms]
    if not rows:
        raise ValueError(f"no MetaGrad-Distill benchmark results in {', '.join(map(str, paths))}")
    frame = pd.DataFrame(rows)
    # A point that ran in one round and ran out of memory in another stays both.
    return frame.drop_duplicates(subset=["run", "name", "oom"], keep="last")


def add_speedup(frame, reference):
    """speedup = fastest reference implementation's median / this median, at the
    same run, stage and shape (so the best reference itself is at 1.0)."""
    frame = frame.copy()
    key = ["run", "stage", "shape", "B", "T", "H", "D", "causal", "dtype"]
    refs = frame[frame["impl"].isin(reference) & ~frame["oom"]]
    best = refs.groupby(key, dropna=False)["median_ms"].min().rename("best_reference_ms")
    # Object keys on both sides: the end-to-end rows have no B/H/D (all None), which
    # groupby turns into float NaN, and pandas refuses to merge object with float.
    best = best.reset_index().astype({c: object for c in key})
    frame = frame.astype({c: object for c in key}).merge(best, on=key, how="left")
    frame["speedup"] = frame["best_reference_ms"] / frame["median_ms"]
    return add_ceiling(frame)


def add_ceiling(frame):
    """ceiling = best reference's round / the stand-in round of the same run and shape: the
    speedup a free attention would give, which no kernel can pass (end-to-end rows only)."""
    frame = frame.copy()
    e2e = frame[(frame["stage"] == E2E_STAGE) & ~frame["oom"]]
    standin = e2e[e2e["impl"] == STANDIN].groupby(["run", "shape"])["median_ms"].min()
    standin = standin.rename("standin_ms").reset_index().astype({"run": object, "shape": object})
    frame = frame.astype({"run": object, "shape": object}).merge(standin, on=["run", "shape"],
                                                                  how="left")
    frame["ceiling"] = frame["best_reference_ms"] / frame["standin_ms"]
    frame.loc[(frame["stage"] != E2E_STAGE) | (frame["impl"] == STANDIN), "ceiling"] = math.nan
    return frame


# ----------------------------------------------------------------- markdown

def _cell(value):
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, bool):
        return "yes" if value else ""
    return "" if value is None else str(value)


def markdown_table(frame):
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _impl_rank(series):
    return series.map(lambda s: IMPL_ORDER.index(s) if s in IMPL_ORDER else len(IMPL_ORDER))


def write_markdown(frame, out, reference):
    kernels = frame[frame["stage"].isin(KERNEL_STAGES)].copy()
    e2e = frame[frame["stage"] == E2E_STAGE].copy()
    lines = ["# Benchmark report", ""]
    runs = sorted(frame["run"].unique())
    gpus = sorted({g for g in frame["gpu"].dropna().unique()})
    commits = sorted({c for c in frame["commit"].dropna().unique() if c})
    lines += [f"Runs: {', '.join(runs)}. Device: {', '.join(gpus) or 'unknown'}. "
              f"Commit: {', '.join(commits) or 'unknown'}.", ""]
    if not kernels.empty:
        kernels["stage_rank"] = kernels["stage"].map(KERNEL_STAGES.index)
        kernels["impl_rank"] = _impl_rank(kernels["impl"])
        kernels = kernels.sort_values(["run", "stage_rank", "dtype", "causal", "B", "H", "D", "T",
                                       "impl_rank"])
        cols = ["run", "stage", "shape", "impl", "median_ms", "iqr_ms", "tflops", "speedup",
                "memory_mib", "oom_note"]
        if len(runs) == 1:
            cols.remove("run")
        lines += ["## Attention kernels", "",
                  "Median over rounds; TFLOP/s counts 2, 5, 12 and 24 products of "
                  "T x T x D per head for forward, backward, double backward and HVP, "
                  "halved for causal. Speedup: the fastest of the reference "
                  f"implementations ({', '.join(reference)}) divided by this one. "
                  "Memory: XLA's buffer assignment for the benchmarked function "
                  "(the allocator's peak where that is missing). oom_note: yes, it ran out "
                  "of memory; T>=N: not attempted, as it ran out at the shorter T=N.", "",
                  markdown_table(kernels[cols]), ""]
    if not e2e.empty:
        e2e["impl_rank"] = _impl_rank(e2e["impl"])
        e2e = e2e.sort_values(["run", "shape", "impl_rank"])
        cols = ["run", "shape", "impl", "median_ms", "iqr_ms", "speedup", "ceiling", "memory_mib",
                "peak_mib", "oom"]
        if len(runs) == 1:
            cols.remove("run")
        lines += ["## One metagradient round", "",
                  "Seconds per round of `mgd.pipeline.oracle.metagradient_round` (shown in "
                  "ms), per round shape (name:T) and attention implementation. Speedup: the "
                  "fastest reference's round over this one; ceiling: the fastest reference's "
                  "round over the stand-in's (attention replaced by `v + 1e-6 (q + k)`), the "
                  "most any attention kernel could give.", "",
                  markdown_table(e2e[cols]), ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf8")


# -------------------------------------------------------------------- plots

def _color(impl):
    # One colour per implementation in every panel, whichever points are missing.
    return f"C{IMPL_ORDER.index(impl)}" if impl in IMPL_ORDER else None


def _label(impl, run, runs):
    return impl if len(runs) == 1 else f"{impl} ({run})"


def _memory_panel(ax, sub, runs):
    """Memory against T; out-of-memory points are red crosses at the memory the
    compiled function asked for, or along the top edge where that is unknown."""
    top = sub["memory_mib"].max()
    top = top * 1.5 if top == top else 1.0
    for (impl, run), line in sub[~sub["oom"]].groupby(["impl", "run"]):
        line = line.sort_values("T")
        ax.plot(line["T"], line["memory_mib"], marker="o", color=_color(impl),
                label=_label(impl, run, runs))
    ooms = sub[sub["oom"]]
    if not ooms.empty:
        ys = ooms["memory_mib"].where(ooms["memory_mib"] == ooms["memory_mib"], top)
        ax.scatter(ooms["T"], ys, marker="x", s=80, color="red", zorder=5, label="out of memory")
        for t, y, impl in zip(ooms["T"], ys, ooms["impl"]):
            ax.annotate(impl, (t, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color="red")
    ax.set_ylabel("memory (MiB)")


def _xlog(ax, ts):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ts)))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("sequence length T")
    ax.grid(True, alpha=0.3)


def plot_kernels(frame, out):
    written = []
    runs = sorted(frame["run"].unique())
    kernels = frame[frame["stage"].isin(KERNEL_STAGES)]
    for (stage, *config), sub in kernels.groupby(["stage", *CONFIG_KEYS], dropna=False):
        b, h, d, causal, dtype = config
        b, h, d = (int(x) for x in (b, h, d))
        title = (f"{stage}: B={b} H={h} D={d} {'causal' if causal else 'full'} {dtype}")
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for (impl, run), line in sub[~sub["oom"]].groupby(["impl", "run"]):
            line = line.sort_values("T")
            label = _label(impl, run, runs)
            axes[0].plot(line["T"], line["tflops"], marker="o", color=_color(impl), label=label)
            axes[1].plot(line["T"], line["speedup"], marker="o", color=_color(impl), label=label)
        axes[0].set_ylabel("effective TFLOP/s")
        axes[1].set_ylabel("speedup over best reference")
        axes[1].axhline(1.0, color="gray", lw=0.8, ls="--")
        _memory_panel(axes[2], sub, runs)
        for ax in axes:
            _xlog(ax, sub["T"])
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        name = f"{stage}_b{b}_h{h}_d{d}_{'causal' if causal else 'full'}_{dtype}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)
    return written


def _round_family(shape):
    """"gpt2s:8192" -> "gpt2s": one figure per round shape; runs saved before the shapes
    were named ("t512-l4-d256") form one family."""
    return shape.split(":")[0] if isinstance(shape, str) and ":" in shape else "model"


def plot_e2e(frame, out):
    e2e = frame[frame["stage"] == E2E_STAGE]
    if e2e.empty:
        return []
    runs = sorted(frame["run"].unique())
    written = []
    for family, sub in e2e.groupby(e2e["shape"].map(_round_family)):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for (impl, run), line in sub[~sub["oom"]].groupby(["impl", "run"]):
            line = line.sort_values("T")
            axes[0].plot(line["T"], line["median_ms"] / 1e3, marker="o", color=_color(impl),
                         label=_label(impl, run, runs))
        axes[0].set_ylabel("seconds per metagradient round")
        _memory_panel(axes[1], sub, runs)
        for ax in axes:
            _xlog(ax, sub["T"])
            ax.legend(fontsize=8)
        fig.suptitle(f"one metagradient round ({family})")
        fig.tight_layout()
        name = "metagradient_round.png" if family == "model" else f"metagradient_round_{family}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="SAVED_JSON",
                        help="pytest-benchmark JSON files (or $MGD_BENCH_JSONL logs)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--reference", default=",".join(DEFAULT_REFERENCE),
                        help="implementations the speedup is measured against "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    reference = tuple(r.strip() for r in args.reference.split(",") if r.strip())
    try:
        frame = add_speedup(load(args.runs), reference)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "results.csv", index=False)
    write_markdown(frame, args.out, reference)
    figures = plot_kernels(frame, args.out) + plot_e2e(frame, args.out)
    print(f"wrote {args.out / 'report.md'}, results.csv and {len(figures)} figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
