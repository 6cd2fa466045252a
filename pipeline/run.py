"""The whole experiment as one resumable run: `mgd run --preset NAME`.

Stages, each a folder of the run folder that is complete iff it holds `DONE`:

    corpus        build the three clusters, target and evaluation sets   (corpus.py)
    base          pretrain the base model on the mixed corpus            (stages.py)
    target        only with --target or --target-source: the target's documents split
                  into the target set and the evaluation set             (target.py)
    oracle        metagradient labels on a pool of rows                  (oracle.py)
    features      the scorer's features of every row
    scorer        ridge vs MLP on the oracle labels; score every row
    select-<m>    each method's selection for the budget                 (methods.py)
    population    perplexity correlations' population (one per seed)
    continued-<m>-s<seed>   continued pretraining on a selection         (continued.py)
    report        results.csv, report.md, plots                          (report.py)

A re-run skips every complete stage; a killed run loses only the stage in progress
(training stages resume from their last checkpoint in `_ckpt/`). `plan.json` pins the
run's settings once its first stage is complete: a later run into the same folder with
other settings is refused, so no stage is reused under settings it was not built with.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgd.errors import UsageError
from mgd.pipeline import artifacts, presets
from mgd.pipeline.config import OURS, RunConfig, plan_differences, to_plan, validate
from mgd.pipeline.methods import distilled_pick, distilled_rule, selection_stage
from mgd.pipeline.stages import (
    RunState,
    base_stage,
    corpus_stage,
    describe_target,
    features_stage,
    load_params,
    oracle_stage,
    remove_tree,
    save_params,
    scorer_stage,
    target_eval_stage,
    target_stage,
)

__all__ = ["run", "run_prepared", "prepare", "resolve_sources", "check_environment", "RunResult",
           "copy_for_scorer_variant", "load_params", "save_params", "distilled_rule", "OURS"]

log = logging.getLogger(__name__)

# The report's bars are set for the demo's scale; at other scales they are informational.
BAR_SCALES = ("demo", "full")
# results.csv's `eval_set` column, present only when the run has a target of its own.
EVAL_SET_OF_TARGET = "target held-out documents"


@dataclass
class RunResult:
    run_dir: Path
    summary: object          # pandas DataFrame: one row per method
    scorer_summary: dict
    top_share: float         # on-target share of the distilled top 10%


# ---------------------------------------------------------------------------------------
# Before any stage: resolve and check everything a user can get wrong
# ---------------------------------------------------------------------------------------

def resolve_sources(cfg: RunConfig, env=None) -> RunConfig:
    """`cfg` with its corpus sources chosen: a given file (checked), else
    $MGD_DATA_DIR's ontarget.jsonl.gz / offtarget.jsonl.gz, else the hub."""
    env = os.environ if env is None else env
    given = {"ontarget": cfg.corpus.ontarget, "offtarget": cfg.corpus.offtarget}
    chosen = {}
    data_dir = env.get("MGD_DATA_DIR")
    for name, spec in given.items():
        if spec is not None:
            path = Path(str(spec).partition("#")[0])
            if not str(spec).startswith("hf:") and not path.is_file():
                raise UsageError(f"--{name} {spec}: no such file")
            chosen[name] = str(spec)
        elif data_dir:
            path = Path(data_dir) / f"{name}.jsonl.gz"
            if not Path(data_dir).is_dir():
                raise UsageError(f"MGD_DATA_DIR={data_dir} is not a folder")
            if not path.is_file():
                raise UsageError(f"MGD_DATA_DIR={data_dir} has no {path.name}")
            chosen[name] = str(path)
        else:
            chosen[name] = presets.HUB_ONTARGET if name == "ontarget" else presets.HUB_OFFTARGET
    if cfg.target is not None and not Path(cfg.target).is_file():
        raise UsageError(f"--target {cfg.target}: no such file")
    target = str(Path(cfg.target).resolve()) if cfg.target else None
    if cfg.corpus.target_source is not None:
        from mgd.pipeline.sources import resolve_source_name
        chosen["target_source"] = resolve_source_name(chosen["ontarget"], cfg.corpus.target_source)
    corpus = dataclasses.replace(cfg.corpus, **chosen)
    return cfg.replace(corpus=corpus, target=target)


def prepare(cfg: RunConfig, env=None) -> RunConfig:
    """The config checked (`config.validate`) and its sources resolved; no machine checks."""
    validate(cfg)
    return resolve_sources(cfg, env)


def check_environment(cfg: RunConfig, *, yes: bool = False) -> None:
    """UsageError if this machine cannot run `cfg`: an attention backend it lacks, or a
    preset sized for a GPU on a machine without one (unless `yes`)."""
    from mgd import backends, devices
    impl = cfg.model.attention_impl
    if impl in ("cuda", "triton"):
        reason = devices.gpu_unavailable_reason()
        if reason is not None:
            raise UsageError(f"--attention-impl {impl}: {reason}")
    if impl != "auto":
        import jax
        import jax.numpy as jnp
        head = cfg.model.d_model // cfg.model.n_head
        q = jax.ShapeDtypeStruct((1, cfg.corpus.seq_len, cfg.model.n_head, head),
                                 jnp.dtype(cfg.model.compute_dtype))
        reason = backends.unavailable_reason(impl, q, q, q, causal=True)
        if reason is not None:
            raise UsageError(f"--attention-impl {impl}: {reason}")
    info = presets.INFO.get(cfg.name)
    if info and info.gpu and not yes and devices.gpu_unavailable_reason() is not None:
        raise UsageError(f"--preset {cfg.name} is sized for {info.gpu} and this machine has no "
                         f"GPU; pass --yes to run it anyway")


def check_out(out: Path, plan: dict) -> None:
    """UsageError if `out` is a file, or a run folder pinned to other settings."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder; give a folder for the run")
    path = out / "plan.json"
    if path.is_file():
        try:
            saved = artifacts.read_json(path)
        except ValueError:
            raise UsageError(f"--out {out}: its plan.json is not valid JSON; delete it or use "
                             f"a new --out folder") from None
        diff = plan_differences(saved, plan)
        if diff:
            shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise UsageError(f"--out {out}: holds a run with different settings ({shown}); "
                             f"use a new --out folder or delete {out}")


def pin_plan(run_dir: Path, plan: dict) -> None:
    """Write plan.json once the first stage is complete (a run that failed before that
    can be retried into the same folder with other settings)."""
    if not (run_dir / "plan.json").exists():
        artifacts.atomic_write_json(run_dir / "plan.json", plan)


def _enable_compilation_cache() -> None:
    """Identical programs (each training run jits the same update step) compile once
    per machine instead of once per call."""
    import jax
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or getattr(
            jax.config, "jax_compilation_cache_dir", None):
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mgd" / "jax"
    try:
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except (AttributeError, KeyError, ValueError):
        pass   # a JAX without these options: compile as usual


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

def run(cfg: RunConfig | str = "smoke", out=None, *, progress: bool = True, yes: bool = False,
        env=None, processes=None) -> RunResult | None:
    """Run (or resume) the experiment `cfg` (a RunConfig or a preset's name) in `out`
    (default runs/<name>).

    With several processes (`processes`, `distributed.Processes`; default JAX's), process
    0 builds the stages before the oracle while the others wait and then read them, every
    process labels its share of the rounds, and process 0 runs the rest; the others
    return None once the labels are merged."""
    cfg = presets.get(cfg) if isinstance(cfg, str) else cfg
    return run_prepared(prepare(cfg, env), out, progress=progress, yes=yes, processes=processes)


def run_prepared(cfg: RunConfig, out=None, *, progress: bool = True, yes: bool = False,
                 processes=None) -> RunResult | None:
    """`run` of a config that `prepare` has already checked and resolved (the CLI
    prepares it once, before connecting the processes)."""
    from mgd.pipeline import distributed
    processes = processes or distributed.current()
    check_environment(cfg, yes=yes)
    plan = to_plan(cfg)
    run_dir = Path(out or Path("runs") / cfg.name)
    check_out(run_dir, plan)
    run_dir.mkdir(parents=True, exist_ok=True)
    _enable_compilation_cache()
    sel = cfg.selection
    budget = (f"{sel.budget_fraction:g} of the corpus" if sel.budget_fraction is not None
              else f"{sel.budget_tokens} tokens")
    log.info(f"run folder {run_dir} (preset {cfg.name}, budget {budget}, {cfg.seeds} seeds)")

    def before_oracle():
        from mgd.pipeline.selection import budget_rows
        corpus = corpus_stage(run_dir, cfg)
        pin_plan(run_dir, plan)
        n, width = corpus.tokens.shape
        seq_len = width - 1
        try:
            k = budget_rows(n, seq_len, fraction=sel.budget_fraction, tokens=sel.budget_tokens)
        except ValueError as err:
            raise UsageError(f"selection budget: {err}") from None
        log.info(f"corpus: {n} sequences of {seq_len} tokens; budget = {k} sequences "
                 f"({k * seq_len} tokens)")
        model_cfg = cfg.model_config(vocab_size=corpus.vocab_size)

        base, base_eval, adam = base_stage(run_dir, cfg, corpus, model_cfg, progress)
        corpus, target_info = target_stage(run_dir, cfg, corpus)
        if target_info is not None:
            base_eval = target_eval_stage(run_dir, cfg, corpus, model_cfg, base, base_eval)
        return corpus, k, model_cfg, base, base_eval, adam, target_info

    # Process 0 builds these stages; the others then read them from the run folder.
    if not processes.is_first:
        processes.barrier("stages before the oracle")
    corpus, k, model_cfg, base, base_eval, adam, target_info = before_oracle()
    if processes.is_first:
        processes.barrier("stages before the oracle")
    labels = oracle_stage(run_dir, cfg, corpus, model_cfg, base, adam, progress)
    if not processes.is_first:
        log.info(f"process {processes.index}: its rounds are labeled and merged; features, "
                 "scorer, selection, continued pretraining and the report run on process 0")
        return None
    feats = features_stage(run_dir, cfg, corpus, model_cfg, base, adam, progress)
    scored = scorer_stage(run_dir, cfg, feats, labels)
    state = RunState(run_dir=run_dir, cfg=cfg, corpus=corpus, model_cfg=model_cfg, base=base,
                     base_eval_loss=base_eval, k=k, hidden=feats[:, :model_cfg.d_model],
                     labels=labels, scored=scored, progress=progress, target_info=target_info)
    selections = {m: selection_stage(m, state) for m in sel.methods}
    results, logs, trained_now = continued_stages(state, selections)
    top_share, summary = report_stage(state, selections, results, logs, trained_now)
    return RunResult(run_dir=run_dir, summary=summary, scorer_summary=scored.summary,
                     top_share=top_share)


def continued_stages(state: RunState, selections: dict):
    """Continued pretraining of every method for every seed; (results, logs, whether any
    run trained now)."""
    from mgd.pipeline import continued as cont
    from mgd.pipeline.selection import composition
    results, logs, trained_now = [], {}, False
    for m in state.cfg.selection.methods:
        for s in range(state.cfg.seeds):
            idx = selections[m][s % len(selections[m])]
            if not (state.run_dir / f"continued-{m}-s{s}" / "DONE").exists():
                trained_now = True
                log.info(f"continued: {m} seed {s} ({len(idx)} rows selected)")
            res, tlog = cont.run_stage(state.run_dir, m, s, base_params=state.base,
                                       tokens=state.corpus.tokens, indices=idx,
                                       budget_rows=state.k, eval_tokens=state.corpus.eval_tokens,
                                       model_cfg=state.model_cfg, cfg=state.cfg.continued,
                                       progress=state.progress, base_eval_loss=state.base_eval_loss)
            share = composition(idx, state.corpus.cluster, 3)
            res.update(ontarget_share=float(share[0]), offtarget_share=float(share[1]),
                       corrupt_share=float(share[2]))
            if state.target_info is not None:
                res["eval_set"] = EVAL_SET_OF_TARGET
            results.append(res)
            logs[(m, s)] = tlog
    log.info("continued: all runs complete")
    return results, logs, trained_now


def report_stage(state: RunState, selections: dict, results, logs, trained_now: bool):
    """results.csv, report.md and the plots (rebuilt when any training ran now), copied
    to the top of the run folder; (top share, per-method summary)."""
    from mgd.pipeline import report as report_mod
    from mgd.pipeline.selection import composition
    cfg, corpus, run_dir = state.cfg, state.corpus, state.run_dir
    n, seq_len = corpus.tokens.shape[0], corpus.tokens.shape[1] - 1
    top10 = distilled_pick(state, max(1, round(0.1 * n)))
    top_share = float(composition(top10, corpus.cluster, 3)[0])
    at_bar_scale = cfg.name in BAR_SCALES
    target_words, eval_words = describe_target(state.target_info, corpus)
    st = artifacts.stage(run_dir, "report")
    if st.done and trained_now:
        remove_tree(st.path)   # new results: the old report is stale (and cheap to rebuild)
    if not st.done:
        oracle_summary = {**artifacts.read_json(run_dir / "oracle" / "summary.json"),
                          "inner_lr": cfg.oracle.inner_lr, "inner_steps": cfg.oracle.inner_steps,
                          "label_mean_by_cluster": _label_means(state.labels, corpus.cluster)}
        with st as tmp:
            report_mod.write_report(
                run_dir, results, logs, {m: selections[m].reshape(-1) for m in selections},
                corpus.cluster, scorer_summary=state.scored.summary,
                heldout={"labels": state.scored.heldout_labels, "pred": state.scored.heldout_pred},
                base_eval_loss=state.base_eval_loss, top_share=top_share, out_dir=tmp,
                oracle_summary=oracle_summary, bars_informational=not at_bar_scale,
                eval_set=("held-out documents of the target" if state.target_info
                          else "held-out on-target set"),
                meta={"preset": cfg.name, "sequences": n, "seq_len": seq_len,
                      "budget": f"{state.k} sequences ({state.k * seq_len} tokens)",
                      "seeds": cfg.seeds, "target": target_words, "evaluation set": eval_words,
                      "oracle labeled rows": len(state.labels.indices),
                      "distilled selection": distilled_rule(cfg),
                      "on-target share of the distilled top 10%": f"{100 * top_share:.1f}%"})
    # The report's files also sit at the top of the run folder, where people look.
    for f in sorted(st.path.iterdir()):
        if f.suffix in (".csv", ".md", ".png"):
            _copy(f, run_dir / f.name)
    _rmdir_if_empty(run_dir / "_ckpt")
    summary = report_mod.summarize(report_mod.results_frame(results))
    log.info(f"report: {run_dir / 'report.md'}" + ("" if at_bar_scale else
             f"; its demo-bar checks are informational at the {cfg.name} scale (they are "
             f"meaningful at the demo scale)"))
    return top_share, summary


def _label_means(labels, cluster) -> dict:
    """Mean oracle label per ground-truth cluster (reported, never used to select)."""
    from mgd.pipeline.corpus import CLUSTERS
    cl = np.asarray(cluster)[labels.indices]
    return {name: float(labels.scores[cl == i].mean()) for i, name in CLUSTERS.items()
            if np.any(cl == i)}


# The stages that depend on the scorer's features; the rest of a run does not.
SCORER_STAGES = ("features", "scorer", f"select-{OURS}", f"continued-{OURS}-*", "report*",
                 "results.csv", "*.png", "plan.json", "_ckpt")


def copy_for_scorer_variant(src, dst) -> None:
    """Copy a run folder without its scorer-dependent stages (`SCORER_STAGES`), so that
    a run with other scorer settings in `dst` reuses its corpus, base model, labels and
    baselines and redoes only the scorer's stages."""
    src, dst = Path(src), Path(dst)
    if not (src / "plan.json").exists():
        raise UsageError(f"{src} is not a run folder (no plan.json)")
    if dst.exists():
        raise UsageError(f"{dst} exists; give a new folder for the variant")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*SCORER_STAGES))


def _rmdir_if_empty(path) -> None:
    try:
        Path(path).rmdir()
    except OSError:
        pass


def _copy(src, dst) -> None:
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


if __name__ == "__main__":   # python -m mgd.pipeline.run is `mgd run`
    from mgd.cli import main
    sys.exit(main(["run", *sys.argv[1:]]))
