"""The run's report: results.csv, report.md and four plots, from the stage outputs.

Everything here reads plain tables and arrays, so a report can be rebuilt from a
finished run folder without touching a model.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from mgd.pipeline.config import ABLATIONS, METHODS, OURS, SIMILARITY_BASELINES
from mgd.pipeline.paired import AHEAD, paired_differences

CLUSTER_NAMES = ("on-target", "off-target", "corrupt")
# One colour per method in every plot (ours the red that stands out; its ablations in
# shades of it).
METHOD_COLORS = dict(zip(METHODS, ("tab:red", "tab:orange", "tab:gray", "tab:brown",
                                   "tab:purple", "tab:blue", "tab:green", "tab:cyan",
                                   "tab:olive", "tab:pink", "darkred", "salmon", "gold")))
BASELINES_TO_BEAT = ("random", "low_perplexity", "ppl_correlations", "dsir") + SIMILARITY_BASELINES
INFORMATIONAL = ("These bars are set for the demo preset's scale; at this scale they are "
                 "informational (a [FAIL] here says nothing about the method).")


def method_color(method: str) -> str:
    return METHOD_COLORS.get(method, "black")


def results_frame(results: list[dict]) -> pd.DataFrame:
    """One row per (method, seed)."""
    if not results:
        raise ValueError("no continued-pretraining results to report")
    df = pd.DataFrame(results)
    first = ["method", "seed", "eval_loss", "eval_ppl"]
    return df[first + [c for c in df.columns if c not in first]].sort_values(["method", "seed"])


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and standard error of eval loss / perplexity per method,
    best (lowest mean eval loss) first."""
    g = df.groupby("method")
    out = pd.DataFrame({
        "seeds": g.size(),
        "eval_loss_mean": g["eval_loss"].mean(),
        "eval_loss_std": g["eval_loss"].std(ddof=1),
        "eval_ppl_mean": g["eval_ppl"].mean(),
        "eval_ppl_std": g["eval_ppl"].std(ddof=1),
    })
    out["eval_loss_sem"] = out["eval_loss_std"] / np.sqrt(out["seeds"])
    for col in ("ontarget_share", "offtarget_share", "corrupt_share"):
        if col in df:
            out[col] = g[col].mean()
    return out.sort_values("eval_loss_mean")


def spearman_vs_labels(scorer_summary: dict | None) -> float | None:
    """The winner's held-out Spearman against the oracle labels."""
    return (scorer_summary or {}).get("heldout_spearman_winner")


def bar_checks(summary: pd.DataFrame, scorer_summary: dict | None, top_share: float | None,
               paired: pd.DataFrame | None = None,
               aim_spearman: float = 0.85) -> list[tuple[str, bool | None, str]]:
    """The demo's bar, as (check, passed or None if not measurable, detail). Against each
    baseline the check passes only when the paired 95% interval of ours - baseline over
    seeds lies below zero (`paired.py`)."""
    checks = []
    rho = spearman_vs_labels(scorer_summary)
    checks.append((f"distilled scorer held-out Spearman vs oracle >= {aim_spearman}",
                   None if rho is None else rho >= aim_spearman,
                   "n/a" if rho is None else f"{rho:.3f} ({scorer_summary['winner']})"))
    means = summary["eval_loss_mean"]
    ours = means.get(OURS)
    paired = paired if paired is not None else pd.DataFrame()
    for other in BASELINES_TO_BEAT:
        name = f"eval loss below {other} (paired 95% interval over seeds below zero)"
        if ours is None or other not in means or other not in paired.index:
            checks.append((name, None, "method not run"))
            continue
        p = paired.loc[other]
        if p["seeds"] < 2:
            checks.append((name, None, f"{int(p['seeds'])} seed: no interval"))
            continue
        checks.append((name, bool(p["verdict"] == AHEAD),
                       f"{ours:.4f} vs {means[other]:.4f}; difference {p['diff_mean']:+.4f} "
                       f"[{p['diff_low']:+.4f}, {p['diff_high']:+.4f}] over {int(p['seeds'])} "
                       f"seeds: {p['verdict']}"))
    if ours is None or "oracle_ontarget" not in means:
        checks.append(("eval loss within 1% of the on-target oracle", None, "method not run"))
    else:
        gap = ours / means["oracle_ontarget"] - 1.0
        checks.append(("eval loss within 1% of the on-target oracle", bool(gap <= 0.01),
                       f"{ours:.4f} vs {means['oracle_ontarget']:.4f} ({100 * gap:+.2f}%)"))
    checks.append((">= 95% of the distilled top 10% on-target",
                   None if top_share is None else top_share >= 0.95,
                   "n/a" if top_share is None else f"{100 * top_share:.1f}%"))
    return checks


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    """A GitHub-style table (pandas' to_markdown needs `tabulate`, not a dependency)."""
    df = df.reset_index()
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(v) else floatfmt.format(v)
        return str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_report(run_dir, results: list[dict], logs: dict, selections: dict, cluster,
                 scorer_summary: dict | None = None, heldout: dict | None = None,
                 base_eval_loss: float | None = None, top_share: float | None = None,
                 meta: dict | None = None, out_dir=None,
                 oracle_summary: dict | None = None,
                 bars_informational: bool = False,
                 eval_set: str = "held-out on-target set") -> pd.DataFrame:
    """Write results.csv, report.md and the plots into `out_dir` (default run_dir).

    logs: {(method, seed): training log}; selections: {method: the rows of all its
    draws, pooled (the composition plot then shows the mean over seeds for methods that
    draw per seed)};
    heldout: {"labels", "pred"} of the scorer's held-out rows;
    bars_informational: the run is not at the scale the demo bar is set for (the
    checklist then says so above its lines);
    eval_set: what the evaluation loss is measured on, in words.
    Returns the per-method summary.
    """
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = results_frame(results)
    df.to_csv(out / "results.csv", index=False)
    summary = summarize(df)
    plots = {
        "eval_loss.png": plot_eval_loss(summary, base_eval_loss, out / "eval_loss.png"),
        "composition.png": plot_composition(selections, cluster, out / "composition.png"),
        "training_curves.png": plot_curves(logs, base_eval_loss, out / "training_curves.png"),
    }
    if heldout is not None:
        plots["oracle_vs_predicted.png"] = plot_oracle_vs_pred(
            heldout["labels"], heldout["pred"], out / "oracle_vs_predicted.png")
    paired = paired_differences(df, OURS)
    if len(paired):
        paired.to_csv(out / "paired.csv")
    checks = bar_checks(summary, scorer_summary, top_share, paired)
    ablations = [m for m in ABLATIONS if m in summary.index]

    lines = ["# MetaGrad-Distill run report", ""]
    if meta:
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    if base_eval_loss is not None:
        lines += [f"Base model before continued pretraining: eval loss {base_eval_loss:.4f} "
                  f"(perplexity {math.exp(base_eval_loss):.2f}).", ""]
    lines += [f"## Evaluation loss after continued pretraining ({eval_set})", "",
              "Mean, standard deviation and standard error over seeds; lower is better. "
              "Shares are the ground-truth cluster composition of each selection.", "",
              markdown_table(summary.drop(index=ablations)), ""]
    if ablations:
        lines += ["## Ablations: the distilled rule and the distilled score apart", "",
                  "rule_nearest and rule_random: the distilled selection's rule with the "
                  "score replaced by the nearest-to-target cosine and by a random score; "
                  "distilled_topk: the distilled score's plain top k. Same columns as above.",
                  "", markdown_table(summary.loc[[m for m in (OURS, *ablations)
                                                  if m in summary.index]]), ""]
    if len(paired):
        lines += [f"## Paired comparison: {OURS} minus each method", "",
                  "Per seed, the distilled selection's evaluation loss minus the other "
                  "method's (same training seed); the mean over seeds and its 95% "
                  "t-interval. Negative: the distilled selection is ahead. \"ahead\" / "
                  "\"behind\" only when the interval excludes zero.", "",
                  markdown_table(paired), ""]
    if oracle_summary:
        o = oracle_summary
        means = ", ".join(f"{k} {v:+.3f}" for k, v in o.get("label_mean_by_cluster", {}).items())
        rose = o.get("phi_rose_fraction")
        lines += ["## Oracle", "",
                  f"{o['rounds']} rounds, {o['labeled_rows']} rows labeled "
                  f"({o['mean_rounds_per_row']:.1f} rounds per row); {o['inner_steps']} inner "
                  f"Adam steps at lr {o['inner_lr']:g}. Target loss Phi over the inner steps: "
                  f"{o.get('phi0_mean', float('nan')):.4f} -> {o['phi_mean']:.4f}, risen in "
                  f"{'n/a' if rose is None else f'{100 * rose:.0f}%'} of rounds.", "",
                  f"Mean label (within-round z-score of -dPhi/dw) per ground-truth cluster: "
                  f"{means}.", ""]
        rel = o.get("label_reliability")
        if rel is not None:
            lines += [f"Label reliability (split-half over each row's rounds, Spearman-Brown): "
                      f"{rel:.3f}. A scorer that predicted the noise-free label exactly could "
                      f"expect a held-out Spearman of about {math.sqrt(max(rel, 0.0)):.3f} "
                      f"against these labels.", ""]
    if scorer_summary:
        rhos = ", ".join(f"{k} {v:.3f}" for k, v in scorer_summary["heldout_spearman"].items())
        lines += ["## Distilled scorer", "",
                  f"Held-out Spearman against the oracle labels "
                  f"({scorer_summary['n_heldout']} rows never used for fitting): {rhos}. "
                  f"Winner: **{scorer_summary['winner']}**, refit on all "
                  f"{scorer_summary['n_labeled']} labeled rows to score the corpus.", ""]
    lines += ["## Demo bar", ""]
    if bars_informational:
        lines += [INFORMATIONAL, ""]
    for name, ok, detail in checks:
        mark = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"- [{mark}] {name}: {detail}")
    lines += ["", "## Plots", ""] + [f"![{k}]({k})" for k in plots if plots[k]] + [""]
    lines += ["## Per seed", "", markdown_table(df.set_index("method")), ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_eval_loss(summary, base_eval_loss, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(summary))
    colors = [method_color(m) for m in summary.index]
    ax.bar(x, summary["eval_loss_mean"], yerr=summary["eval_loss_std"].fillna(0), capsize=4,
           color=colors)
    if base_eval_loss is not None:
        ax.axhline(base_eval_loss, color="gray", ls="--", label="base model")
        ax.legend()
    lo = float(np.nanmin(summary["eval_loss_mean"] - summary["eval_loss_std"].fillna(0)))
    hi = float(np.nanmax(summary["eval_loss_mean"] + summary["eval_loss_std"].fillna(0)))
    if base_eval_loss is not None:
        hi = max(hi, base_eval_loss)
    pad = 0.1 * max(hi - lo, 1e-3)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(x, summary.index, rotation=30, ha="right")
    ax.set_ylabel("eval loss (nats/token), mean ± std over seeds")
    ax.set_title("Held-out loss after continued pretraining")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_composition(selections, cluster, path):
    from mgd.pipeline.selection import composition
    plt = _plt()
    names = list(selections)
    comp = np.array([composition(selections[m], cluster, 3) for m in names])
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = np.zeros(len(names))
    for c, (label, color) in enumerate(zip(CLUSTER_NAMES, ("tab:green", "tab:gray", "tab:red"))):
        ax.bar(names, comp[:, c], bottom=bottom, label=label, color=color)
        bottom += comp[:, c]
    ax.set_ylabel("share of the selection")
    ax.set_title("Composition of each selection by ground-truth cluster")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    for tick, method in zip(ax.get_xticklabels(), names):
        tick.set_color(method_color(method))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(logs, base_eval_loss, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    by_method: dict = {}
    for (method, _seed), log in logs.items():
        pts = [(e["step"], e["eval"]["eval"]) for e in log if "eval" in e]
        if base_eval_loss is not None:
            pts = [(0, base_eval_loss)] + pts
        by_method.setdefault(method, []).append(pts)
    for method, runs in sorted(by_method.items()):
        steps = np.array([s for s, _ in runs[0]])
        n = min(len(r) for r in runs)
        vals = np.array([[v for _, v in r[:n]] for r in runs])
        color = method_color(method)
        ax.plot(steps[:n], vals.mean(0), label=method, color=color,
                lw=2.5 if method == OURS else 1.2)
        if len(runs) > 1:
            ax.fill_between(steps[:n], vals.min(0), vals.max(0), alpha=0.15, color=color)
    ax.set_xlabel("continued-pretraining step")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("Training curves (mean over seeds, band = min..max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_oracle_vs_pred(labels, pred, path):
    from mgd.pipeline.scorer import spearman
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(pred, labels, s=6, alpha=0.5, color=method_color(OURS))
    ax.set_xlabel("distilled scorer prediction")
    ax.set_ylabel("oracle label (metagradient score)")
    ax.set_title(f"Held-out rows: Spearman {spearman(pred, labels):.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_summary(summary: pd.DataFrame) -> str:
    """The per-method summary as a plain-text table (the CLI prints it at the end)."""
    cols = ["seeds", "eval_loss_mean", "eval_loss_std", "eval_ppl_mean"]
    cols += [c for c in ("ontarget_share",) if c in summary]
    with pd.option_context("display.width", 120, "display.float_format", "{:.4f}".format):
        return summary[cols].to_string()
