"""The whole experiment as one resumable run: `mgd run --preset NAME`.

Stages, each a folder of `run_dir` that is complete iff it holds `DONE`:

    corpus        build the three clusters, target and evaluation sets   (corpus.py)
    target        only with --target FILE: the target set from that file
    base          pretrain the base model on the mixed corpus
    oracle        metagradient labels on a pool of rows                  (oracle.py)
    features      mean-pooled base-model features of every row
    scorer        ridge vs MLP on the oracle labels; score every row
    population    perplexity-correlations population (bits per byte, target error)
    select-<m>    each method's selection for the budget
    continued-<m>-s<seed>   continued pretraining on a selection
    report        results.csv, report.md, plots

A re-run skips every complete stage; a killed run loses only the stage in progress
(and training stages resume from their last checkpoint in `_ckpt/`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from mgd.pipeline import artifacts, presets as presets_mod
from mgd.pipeline.selection import (budget_to_count, composition, fit_target_modes,
                                    stratified_top_k, top_k)

OURS = "metagrad_distilled"
METHODS = (OURS, "oracle_labels", "random", "low_perplexity", "ppl_correlations", "dsir",
           "oracle_ontarget")


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------

def resolve_sources(ontarget=None, offtarget=None, env=None):
    """(ontarget, offtarget) sources: explicit arguments, else $MGD_DATA_DIR's
    ontarget.jsonl.gz / offtarget.jsonl.gz, else PubMed and C4 from the hub."""
    env = os.environ if env is None else env
    data_dir = env.get("MGD_DATA_DIR")
    defaults = (presets_mod.HUB_ONTARGET, presets_mod.HUB_OFFTARGET)
    if data_dir:
        d = Path(data_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"MGD_DATA_DIR={data_dir} is not a folder")
        defaults = tuple(str(d / f"{n}.jsonl.gz") for n in ("ontarget", "offtarget"))
        for path in defaults:
            if not Path(path).is_file():
                raise FileNotFoundError(f"MGD_DATA_DIR={data_dir} has no {Path(path).name}")
    for name, given in (("--ontarget", ontarget), ("--offtarget", offtarget)):
        if given and not str(given).startswith("hf:") and not Path(str(given).partition("#")[0]).is_file():
            raise FileNotFoundError(f"{name}: no such file: {given}")
    return (str(ontarget) if ontarget else defaults[0],
            str(offtarget) if offtarget else defaults[1])


def build_plan(preset, *, ontarget=None, offtarget=None, target=None, budget=None, seeds=None,
               attention_impl=None, gradient_alignment=None, per_unit_gradient=None,
               target_modes=None, target_gate=None) -> dict:
    """Everything that determines the run's results, as plain JSON."""
    p = presets_mod.get(preset) if isinstance(preset, str) else preset
    on, off = resolve_sources(ontarget, offtarget)
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if target is not None and not Path(target).is_file():
        raise FileNotFoundError(f"--target: no such file: {target}")
    plan = dataclasses.asdict(p)
    plan["corpus"] = {**p.corpus, "ontarget": on, "offtarget": off}
    plan["model"] = {**p.model, "attention_impl": attention_impl or p.model.get("attention_impl", "auto")}
    plan["target"] = str(Path(target).resolve()) if target else None
    plan["budget"] = float(budget) if budget is not None else p.budget
    plan["seeds"] = int(seeds) if seeds is not None else p.seeds
    if gradient_alignment is not None:
        plan["scorer"] = {**plan["scorer"], "gradient_alignment": bool(gradient_alignment)}
    if per_unit_gradient is not None:
        plan["scorer"] = {**plan["scorer"], "per_unit_gradient": bool(per_unit_gradient)}
    if target_modes is not None:
        if not 0 <= int(target_modes) <= plan["corpus"]["n_target"]:
            raise ValueError(f"--target-modes must be between 0 and the target set's "
                             f"{plan['corpus']['n_target']} sequences, got {target_modes}")
        plan["target_modes"] = int(target_modes)
    if target_gate is not None:
        if not 0 <= float(target_gate) <= 1:
            raise ValueError(f"--target-gate must be a quantile in [0, 1] (0: off), got {target_gate}")
        plan["target_gate"] = float(target_gate)
    # Exactly what plan.json will hold (tuples become lists), so a re-run compares equal.
    return json.loads(json.dumps(plan))


# The stages that depend on the scorer's features; the rest of a run does not.
SCORER_STAGES = ("features", "scorer", f"select-{OURS}", f"continued-{OURS}-*", "report*",
                 "results.csv", "*.png", "plan.json", "_ckpt")


def copy_for_scorer_variant(src, dst):
    """Copy a run folder without its scorer-dependent stages (`SCORER_STAGES`), so that
    a run with other scorer settings (e.g. `gradient_alignment`) in `dst` reuses its
    corpus, base model, labels and baselines and redoes only the scorer's stages."""
    import shutil
    src, dst = Path(src), Path(dst)
    if not (src / "plan.json").exists():
        raise FileNotFoundError(f"{src} is not a run folder (no plan.json)")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; give a new folder for the variant")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*SCORER_STAGES))


def _check_plan(run_dir: Path, plan: dict):
    path = run_dir / "plan.json"
    if path.exists():
        saved = artifacts.read_json(path)
        if saved != plan:
            diff = sorted(k for k in set(saved) | set(plan) if saved.get(k) != plan.get(k))
            raise ValueError(f"{run_dir} holds a run with different settings ({', '.join(diff)}); "
                             f"use a new --out folder or delete {run_dir}")
    else:
        artifacts.atomic_write_json(path, plan)


def _enable_compilation_cache():
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
        pass   # an older or newer JAX without these options: compile as usual


# ---------------------------------------------------------------------------------------
# Parameters on disk (train.py checkpoints params with optimizer state; the base model
# alone is needed by several stages, so it is stored by itself).
# ---------------------------------------------------------------------------------------

def save_params(path, params):
    import jax
    leaves = jax.tree_util.tree_leaves(params)
    artifacts.atomic_save_arrays(path, **{f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})


def load_params(path, model_cfg):
    import jax
    import jax.numpy as jnp
    from mgd.pipeline.model import init_params
    like = init_params(model_cfg, jax.random.PRNGKey(0))
    ref = jax.tree_util.tree_leaves(like)
    data = artifacts.load_arrays(path)
    if len(data) != len(ref):
        raise ValueError(f"{path} holds {len(data)} arrays; the model has {len(ref)}")
    leaves = [jnp.asarray(data[f"leaf_{i:05d}"], r.dtype) for i, r in enumerate(ref)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def _base_final_lr(base_train: dict) -> float:
    """The lr the base run ends at (cosine decay to lr * min_lr_ratio)."""
    from mgd.pipeline.train import TrainConfig
    tc = TrainConfig(**base_train)
    return tc.lr * tc.min_lr_ratio


def _base_adam_state(base_dir, model_cfg):
    """(mu, nu, count) of the base run's Adam, saved by the base stage."""
    if not (base_dir / "adam_nu.npz").exists():
        raise FileNotFoundError(f"{base_dir} has no adam_nu.npz (a base stage from before the "
                                f"oracle warm-started Adam): delete {base_dir} and re-run")
    count = artifacts.read_json(base_dir / "adam_count.json")["count"]
    return (load_params(base_dir / "adam_mu.npz", model_cfg),
            load_params(base_dir / "adam_nu.npz", model_cfg), np.int32(count))


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

class _Log:
    def __init__(self, quiet):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg):
        if not self.quiet:
            print(f"[mgd {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


def run(preset="smoke", *, out=None, ontarget=None, offtarget=None, target=None, budget=None,
        seeds=None, attention_impl=None, gradient_alignment=None, per_unit_gradient=None,
        target_modes=None, target_gate=None, progress=True, quiet=False, methods=METHODS):
    """Run (or resume) the experiment; returns the per-method summary DataFrame.
    `gradient_alignment` and `per_unit_gradient` (True/False) override the preset's
    scorer settings of those names; `target_modes` (an int) and `target_gate` (a quantile,
    0: off) its distilled selection's rule (`distilled_rule`)."""
    plan = build_plan(preset, ontarget=ontarget, offtarget=offtarget, target=target,
                      budget=budget, seeds=seeds, attention_impl=attention_impl,
                      gradient_alignment=gradient_alignment, per_unit_gradient=per_unit_gradient,
                      target_modes=target_modes, target_gate=target_gate)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {METHODS}")
    run_dir = Path(out or Path("runs") / plan["name"])
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_plan(run_dir, plan)
    _enable_compilation_cache()
    log = _Log(quiet)
    progress = progress and not quiet
    log(f"run folder {run_dir} (preset {plan['name']}, budget {plan['budget']}, "
        f"{plan['seeds']} seeds)")

    from mgd.pipeline import corpus as corpus_mod
    from mgd.pipeline.model import GPTConfig, init_params
    from mgd.pipeline.oracle import OracleConfig, label
    from mgd.pipeline.train import TrainConfig, adam_moments, eval_loss, train

    # -- corpus --------------------------------------------------------------------------
    log("corpus: " + ("reusing" if (run_dir / "corpus" / "DONE").exists() else
                      f"building from {plan['corpus']['ontarget']} + {plan['corpus']['offtarget']}"))
    corpus = corpus_mod.build_corpus(corpus_mod.CorpusConfig(**plan["corpus"]), run_dir)
    if plan["target"]:
        corpus = dataclasses.replace(
            corpus, target_tokens=_custom_target_stage(run_dir, corpus, plan["target"],
                                                       plan["corpus"]["n_target"], log))
    n, width = corpus.tokens.shape
    seq_len = width - 1
    k = budget_to_count(plan["budget"], n, seq_len)
    log(f"corpus: {n} sequences of {seq_len} tokens; budget = {k} sequences "
        f"({k * seq_len} tokens)")
    model_cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=seq_len, **plan["model"])

    # -- base model ----------------------------------------------------------------------
    st = artifacts.stage(run_dir, "base")
    if not st.done:
        log("base: pretraining on the mixed corpus")
        tc = TrainConfig(seed=0, **plan["base_train"])
        params0 = init_params(model_cfg, _key(0))
        base, base_log, base_opt = train(params0, corpus.tokens, model_cfg, tc,
                                         ckpt_dir=run_dir / "_ckpt" / "base", progress=progress,
                                         return_opt_state=True)
        base_eval = eval_loss(base, corpus.eval_tokens, model_cfg, plan["loss_batch"])
        mu, nu, count = adam_moments(base_opt)
        with st as tmp:
            save_params(tmp / "params.npz", base)
            # The oracle's inner Adam continues from these (OracleConfig.warm_start).
            save_params(tmp / "adam_mu.npz", mu)
            save_params(tmp / "adam_nu.npz", nu)
            artifacts.atomic_write_json(tmp / "adam_count.json", {"count": int(count)})
            artifacts.atomic_write_json(tmp / "log.json", base_log)
            artifacts.atomic_write_json(tmp / "summary.json", {"eval_loss": base_eval})
        _rm(run_dir / "_ckpt" / "base")
    else:
        log("base: done, skipped")
    base = load_params(st.path / "params.npz", model_cfg)
    base_eval = artifacts.read_json(st.path / "summary.json")["eval_loss"]
    base_adam = _base_adam_state(st.path, model_cfg)   # the oracle's and the features' Adam
    log(f"base: eval loss {base_eval:.4f}")

    # -- oracle --------------------------------------------------------------------------
    base_final_lr = _base_final_lr(plan["base_train"])
    if plan["oracle"]["inner_lr"] > 0.5 * base_final_lr:
        log(f"oracle: WARNING inner_lr {plan['oracle']['inner_lr']:g} is above half the base "
            f"run's final lr ({base_final_lr:g}); at 3x it the labels came out inverted "
            "(bench/results/cpu_2026-11-29_oracle_lr): 0.3x is the tested setting")
    log("oracle: " + ("done, skipped" if (run_dir / "oracle" / "DONE").exists() else "labeling"))
    labels = label(base, corpus, model_cfg, OracleConfig(**plan["oracle"]), run_dir,
                   progress=progress, adam_state=base_adam)
    summary = artifacts.read_json(run_dir / "oracle" / "summary.json")
    log(f"oracle: {len(labels.indices)} rows labeled; target loss over the inner steps "
        f"{summary.get('phi0_mean', float('nan')):.4f} -> {summary['phi_mean']:.4f} "
        f"(rose in {summary.get('phi_rose_fraction') or 0:.0%} of rounds); label reliability "
        f"{summary.get('label_reliability') or float('nan'):.3f}")

    # -- features and the distilled scorer -----------------------------------------------
    from mgd.pipeline import scorer as scorer_mod
    st = artifacts.stage(run_dir, "features")
    if not st.done:
        log("features: one forward pass over the corpus"
            + (" (and a backward pass and a pass back through it, for the whole-model "
               "gradient alignment)"
               if plan["scorer"].get("gradient_alignment") else ""))
        fn = scorer_mod.features_with_loss if plan["scorer"].get("loss_feature") else None
        fparams = base
        if plan["scorer"].get("alignment_feature"):
            if not plan["scorer"].get("loss_feature"):
                raise ValueError("scorer.alignment_feature needs scorer.loss_feature")
            oc = OracleConfig(**plan["oracle"])
            _, nu, count = base_adam
            whole_model = bool(plan["scorer"].get("gradient_alignment"))
            direction = scorer_mod.target_direction(
                base, corpus.target_tokens, model_cfg, nu, count, b2=oc.b2, eps=oc.eps,
                parts="all" if whole_model else "last_layer")
            fn = (scorer_mod.features_with_gradient_alignment if whole_model
                  else scorer_mod.features_with_loss_and_alignment)
            fparams = (base, direction)
        elif plan["scorer"].get("gradient_alignment"):
            raise ValueError("scorer.gradient_alignment needs scorer.alignment_feature")
        feats = scorer_mod.extract_features(fparams, corpus.tokens, model_cfg, features_fn=fn,
                                            batch_size=plan["feature_batch"], progress=progress)
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "features.npz", features=feats)
    feats = artifacts.load_arrays(st.path / "features.npz")["features"]
    # The mixture domains of perplexity correlations use the hidden state only.
    hidden_feats = feats[:, :model_cfg.d_model]

    st = artifacts.stage(run_dir, "scorer")
    if not st.done:
        sc = plan["scorer"]
        targets, extra = labels.scores, {}
        if sc.get("per_unit_gradient"):
            log("scorer: each labeled row's gradient norm in the inner Adam's geometry")
            oc = OracleConfig(**plan["oracle"])
            _, nu, count = base_adam
            norms = scorer_mod.preconditioned_gradient_norms(
                base, corpus.tokens[labels.indices], model_cfg, nu, count, b2=oc.b2, eps=oc.eps)
            targets = labels.scores / np.maximum(norms, np.finfo(np.float64).tiny)
            extra["labeled_grad_norms"] = norms.astype(np.float32)
        log("scorer: fitting ridge and MLP to the oracle labels"
            + (" per unit of gradient norm" if sc.get("per_unit_gradient") else ""))
        fit = scorer_mod.fit_scorer(feats, labels.indices, targets, seed=0,
                                    holdout_fraction=sc["holdout_fraction"],
                                    regressors=tuple(sc["regressors"]), mlp_hidden=sc["mlp_hidden"])
        fit_summary = fit.summary()
        if sc.get("per_unit_gradient"):
            # The bar is against the labels themselves, whatever the scorer was fit to.
            raw = dict(zip(labels.indices.tolist(), labels.scores.tolist()))
            fit_summary["fit_target"] = "oracle label / preconditioned gradient norm"
            fit_summary["heldout_spearman_vs_labels"] = float(scorer_mod.spearman(
                fit.heldout_pred, np.array([raw[i] for i in fit.heldout_indices.tolist()])))
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "scores.npz", scores=fit.scores,
                                         heldout_indices=fit.heldout_indices,
                                         heldout_labels=fit.heldout_labels,
                                         heldout_pred=fit.heldout_pred, **extra)
            feature_set = "mean-pooled final hidden state"
            if sc.get("loss_feature"):
                feature_set += " + per-sequence loss"
            if sc.get("alignment_feature"):
                feature_set += (" + last-layer gradient alignment with the target ("
                                + ", ".join(scorer_mod.ALIGNMENT_COLUMNS) + ")")
            if sc.get("gradient_alignment"):
                feature_set += " + whole-model gradient alignment with the target"
            artifacts.atomic_write_json(tmp / "summary.json",
                                        {**fit_summary, "features": feature_set})
    scorer_summary = artifacts.read_json(st.path / "summary.json")
    scored = artifacts.load_arrays(st.path / "scores.npz")
    log(f"scorer: {scorer_summary['winner']} wins, held-out Spearman "
        + ", ".join(f"{a} {b:.3f}" for a, b in scorer_summary["heldout_spearman"].items())
        + (f" (against the labels themselves: {scorer_summary['heldout_spearman_vs_labels']:.3f})"
           if "heldout_spearman_vs_labels" in scorer_summary else ""))

    # -- selections ----------------------------------------------------------------------
    ctx = dict(run_dir=run_dir, corpus=corpus, base=base, model_cfg=model_cfg, plan=plan, k=k,
               feats=hidden_feats, labels=labels, scores=scored["scores"], progress=progress, log=log)
    selections = {m: _selection_stage(m, ctx) for m in methods}

    # -- continued pretraining -----------------------------------------------------------
    from mgd.pipeline import continued as cont
    ccfg = cont.ContinuedConfig(**plan["continued"])
    results, logs, trained_now = [], {}, False
    for m in methods:
        for s in range(plan["seeds"]):
            idx = selections[m][s % len(selections[m])]
            done = (run_dir / f"continued-{m}-s{s}" / "DONE").exists()
            if not done:
                trained_now = True
                log(f"continued: {m} seed {s} ({len(idx)} rows selected)")
            res, tlog = cont.run_stage(run_dir, m, s, base_params=base, tokens=corpus.tokens,
                                       indices=idx, budget_rows=k, eval_tokens=corpus.eval_tokens,
                                       model_cfg=model_cfg, cfg=ccfg, progress=progress,
                                       base_eval_loss=base_eval)
            share = composition(idx, corpus.cluster, 3)
            res.update(ontarget_share=float(share[0]), offtarget_share=float(share[1]),
                       corrupt_share=float(share[2]))
            results.append(res)
            logs[(m, s)] = tlog
    log("continued: all runs complete")

    # -- report --------------------------------------------------------------------------
    from mgd.pipeline import report as report_mod
    top10 = _distilled_pick(ctx, max(1, round(0.1 * n)))
    top_share = float(composition(top10, corpus.cluster, 3)[0])
    st = artifacts.stage(run_dir, "report")
    if st.done and trained_now:
        _rm(st.path)   # new results: the old report is stale (and cheap to rebuild)
    if not st.done:
        with st as tmp:
            report_mod.write_report(
                run_dir, results, logs, {m: selections[m].reshape(-1) for m in methods},
                corpus.cluster,
                scorer_summary=scorer_summary,
                heldout={"labels": scored["heldout_labels"], "pred": scored["heldout_pred"]},
                base_eval_loss=base_eval, top_share=top_share, out_dir=tmp,
                oracle_summary={**artifacts.read_json(run_dir / "oracle" / "summary.json"),
                                "inner_lr": plan["oracle"]["inner_lr"],
                                "inner_steps": plan["oracle"]["inner_steps"],
                                "label_mean_by_cluster": _label_means(labels, corpus.cluster)},
                meta={"preset": plan["name"], "sequences": n, "seq_len": seq_len,
                      "budget": f"{k} sequences ({k * seq_len} tokens)",
                      "seeds": plan["seeds"], "oracle labeled rows": len(labels.indices),
                      "distilled selection": distilled_rule(plan),
                      "on-target share of the distilled top 10%": f"{100 * top_share:.1f}%"})
    # The report's files also sit at the top of the run folder, where people look.
    for f in sorted(st.path.iterdir()):
        if f.suffix in (".csv", ".md", ".png"):
            _copy(f, run_dir / f.name)
    _rmdir_if_empty(run_dir / "_ckpt")
    summary = report_mod.summarize(report_mod.results_frame(results))
    log(f"report: {run_dir / 'report.md'}")
    if not quiet:
        print()
        report_mod.print_summary(summary)
        print(f"\nscorer held-out Spearman {report_mod.spearman_vs_labels(scorer_summary):.3f} "
              f"({scorer_summary['winner']}); on-target share of its top 10%: "
              f"{100 * top_share:.1f}%")
    return summary


def _label_means(labels, cluster):
    """Mean oracle label per ground-truth cluster (reported, never used to select)."""
    from mgd.pipeline.corpus import CLUSTERS
    cl = np.asarray(cluster)[labels.indices]
    return {name: float(labels.scores[cl == i].mean()) for i, name in CLUSTERS.items()
            if np.any(cl == i)}


def _selection_stage(method, ctx):
    """[n_draws, k'] selected rows for `method` (one draw unless it is seeded)."""
    run_dir, plan, k = ctx["run_dir"], ctx["plan"], ctx["k"]
    st = artifacts.stage(run_dir, f"select-{method}")
    if not st.done:
        ctx["log"](f"select: {method}")
        indices, extra, info = _select(method, ctx)
        indices = np.atleast_2d(np.asarray(indices, np.int64))
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "selection.npz", indices=indices, **extra)
            artifacts.atomic_write_json(tmp / "info.json", {"method": method, "k": k,
                                                             "selected": indices.shape[1], **info})
    return artifacts.load_arrays(st.path / "selection.npz")["indices"]


def _select(method, ctx):
    corpus, plan, k = ctx["corpus"], ctx["plan"], ctx["k"]
    n = corpus.tokens.shape[0]
    seeds = range(plan["seeds"])
    if method == OURS:
        info = {"rule": distilled_rule(plan)}
        if plan.get("target_modes") or plan.get("target_gate"):
            fit = _target_mode_fit(ctx)
            info["target_mode_share"] = [round(float(x), 4) for x in fit.share]
            if plan.get("target_gate"):
                info["typical_rows"] = int(fit.typical(plan["target_gate"]).sum())
        return _distilled_pick(ctx, k), {"scores": ctx["scores"]}, info
    if method == "oracle_labels":
        from mgd.pipeline.baselines import oracle_labels
        idx = oracle_labels.select(n, ctx["labels"].indices, ctx["labels"].scores, k)
        return idx, {}, {"labeled_rows": int(len(ctx["labels"].indices))}
    if method == "random":
        from mgd.pipeline.baselines import random_subset
        return np.stack([random_subset.select(n, k, seed=s) for s in seeds]), {}, {}
    if method == "oracle_ontarget":
        from mgd.pipeline.baselines import oracle_cluster
        return np.stack([oracle_cluster.select(corpus.cluster, k, seed=s) for s in seeds]), {}, {}
    if method == "low_perplexity":
        from mgd.pipeline.baselines import low_perplexity
        score = low_perplexity.scores(ctx["base"], corpus.tokens, ctx["model_cfg"],
                                      batch_size=plan["loss_batch"], progress=ctx["progress"])
        return low_perplexity.select(score, k), {"scores": score}, {}
    if method == "dsir":
        from mgd.pipeline.baselines import dsir
        target_texts = _target_texts(ctx)
        ctx["log"]("dsir: decoding the corpus and fitting hashed n-gram models (one process)")
        idx, w = dsir.select(corpus.texts_by_seq, target_texts, k, seed=0,
                             work_dir=None, progress=ctx["progress"], **plan["dsir"])
        return idx, {"log_importance_weights": w}, {"target_documents": len(target_texts)}
    if method == "ppl_correlations":
        # One population per seed, like random's and oracle_ontarget's draws: the
        # population is random (mixtures, training order, domains) and its selection
        # moved more with the population's seed than with the training seed
        # (bench/results/cpu_2026-11-29_ppl_corr_seeds).
        from mgd.pipeline.baselines import ppl_correlations as pc
        idx, ests, errors = [], [], []
        for seed in seeds:
            x, y = _population_stage(ctx, seed)
            est = pc.estimate(x, y, plan["population"].get("estimator", "spearmanr"))
            idx.append(pc.select(est, k))
            ests.append(est)
            errors.append(y.tolist())
        return np.stack(idx), {"estimate": np.stack(ests)}, {"target_error": errors}
    raise ValueError(f"unknown method {method!r}")


def _population_stage(ctx, seed: int = 0):
    """(per-sequence bits per byte [n_models, N], target error [n_models]) of the
    population drawn with the plan's population seed + `seed` (stage `population` for
    seed 0, `population-s<seed>` for the others)."""
    from mgd.pipeline import continued as cont
    from mgd.pipeline.baselines import common
    from mgd.pipeline.baselines import ppl_correlations as pc
    from mgd.pipeline.train import train
    run_dir, plan, corpus, model_cfg = ctx["run_dir"], ctx["plan"], ctx["corpus"], ctx["model_cfg"]
    st = artifacts.stage(run_dir, "population" if seed == 0 else f"population-s{seed}")
    if not st.done:
        ctx["log"](f"ppl_correlations: training population {seed + 1} of {plan['seeds']}")
        pcfg = pc.PopulationConfig(**{**plan["population"],
                                      "seed": plan["population"].get("seed", 0) + seed})
        tcfg = cont.ContinuedConfig(**plan["population_train"])
        steps = cont.steps_for_budget(pcfg.rows_per_model, tcfg.batch_size, tcfg.epochs)
        domains = pc.unsupervised_domains(ctx["feats"], pcfg.n_domains, pcfg.seed)

        def train_fn(params, rows, seed):
            tc = dataclasses.replace(cont.train_config(tcfg, steps, seed), eval_every=0)
            return train(params, rows, model_cfg, tc, progress=False)[0]

        def loss_fn(params, seqs):
            return common.batched_losses(params, seqs, model_cfg, batch_size=plan["loss_batch"])

        nbytes = common.bytes_per_sequence(corpus.tokens, common.token_byte_lengths(corpus.tokenizer))
        x, y, mix = pc.build_population(ctx["base"], corpus.tokens, corpus.target_tokens, domains,
                                        nbytes, pcfg, train_fn=train_fn, loss_fn=loss_fn,
                                        progress=ctx["progress"])
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "population.npz", bpb=x.astype(np.float32),
                                         target_error=y, mixtures=mix, domains=domains)
    a = artifacts.load_arrays(st.path / "population.npz")
    return a["bpb"].astype(np.float64), a["target_error"]


def distilled_rule(plan) -> str:
    """The distilled selection's rule, in words, from the plan."""
    modes, gate = plan.get("target_modes", 0), plan.get("target_gate", 0.0)
    rule = (f"the score's top k in each of {modes} modes of the target set (quotas by the "
            f"target's shares)" if modes else "the score's top k")
    if gate:
        rule += (f"; rows farther from the target's modes than its own rows' {gate:g} "
                 f"quantile only when no other row is left")
    return rule


def _distilled_pick(ctx, k):
    """The distilled selection of k rows: the score's top k, or stratified by the
    target's modes and gated by likeness to the target, as the plan asks."""
    plan = ctx["plan"]
    if not plan.get("target_modes") and not plan.get("target_gate"):
        return top_k(ctx["scores"], k)
    fit = _target_mode_fit(ctx)
    eligible = fit.typical(plan["target_gate"]) if plan.get("target_gate") else None
    return stratified_top_k(ctx["scores"], fit.mode_of_row, fit.share, k, eligible)


def _target_mode_fit(ctx):
    """`selection.TargetModes` of the plan's target modes (one mode when only the gate
    is asked for), computed once per run from the base model's mean-pooled hidden
    states (the scorer's first columns)."""
    if "_target_mode_fit" not in ctx:
        from mgd.pipeline import scorer as scorer_mod
        m = max(1, ctx["plan"].get("target_modes", 0))
        ctx["log"](f"select: {m} mode{'s' if m > 1 else ''} of the target set")
        target = scorer_mod.extract_features(ctx["base"], ctx["corpus"].target_tokens,
                                             ctx["model_cfg"], batch_size=ctx["plan"]["feature_batch"],
                                             progress=False)
        ctx["_target_mode_fit"] = fit_target_modes(target, ctx["feats"], m, seed=0)
    return ctx["_target_mode_fit"]


def _target_texts(ctx):
    """Documents that define the target domain, for DSIR: the --target file's documents
    if given, else the decoded metagradient target rows."""
    from mgd.pipeline import sources
    if ctx["plan"]["target"]:
        return sources.read_source(ctx["plan"]["target"])
    return ctx["corpus"].decode(ctx["corpus"].target_tokens)


def _custom_target_stage(run_dir, corpus, path, n_target, log):
    """Adapter for --target FILE (the corpus builder only takes the target from held-out
    on-target documents): tokenize the file's documents with the corpus tokenizer and
    pack them into up to `n_target` rows, the same way the corpus packs its pools."""
    from mgd.pipeline import corpus as corpus_mod
    from mgd.pipeline import sources
    st = artifacts.stage(run_dir, "target")
    if not st.done:
        texts = sources.read_source(path)
        if not texts:
            raise ValueError(f"--target {path}: no documents")
        enc = [e.ids for e in corpus.tokenizer.encode_batch(texts)]
        width = corpus.tokens.shape[1]
        available = sum(len(e) + 1 for e in enc) // width
        if available < 1:
            raise ValueError(f"--target {path}: its documents make less than one "
                             f"{width}-token row")
        rows, _, used = corpus_mod.pack_documents(enumerate(enc), min(n_target, available),
                                                  width, corpus.eot)
        log(f"target: {rows.shape[0]} rows from {len(used)} documents of {path}")
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "target.npz", target_tokens=rows)
            artifacts.atomic_write_json(tmp / "info.json", {"source": path, "rows": rows.shape[0],
                                                             "documents": len(used)})
    return artifacts.load_arrays(st.path / "target.npz")["target_tokens"]


def _key(seed):
    import jax
    return jax.random.PRNGKey(seed)


def _rm(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def _rmdir_if_empty(path):
    try:
        Path(path).rmdir()
    except OSError:
        pass


def _copy(src, dst):
    import shutil
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


if __name__ == "__main__":   # python -m mgd.pipeline.run is `mgd run`
    from mgd.cli import main
    sys.exit(main(["run", *sys.argv[1:]]))
