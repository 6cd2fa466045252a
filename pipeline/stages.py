"""The run's stages before selection: corpus, base model, oracle labels, scorer features
and the distilled scorer. Each is a resumable folder of the run (`artifacts.stage`),
built once and read back on every later run.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mgd.errors import UsageError
from mgd.pipeline import artifacts
from mgd.pipeline.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """What the scorer stage leaves: every row's distilled score and the fit's summary."""
    scores: np.ndarray
    summary: dict
    heldout_labels: np.ndarray
    heldout_pred: np.ndarray


@dataclass
class RunState:
    """What the selection methods and the later stages read (once the scorer is done)."""
    run_dir: Path
    cfg: RunConfig
    corpus: object          # corpus.Corpus
    model_cfg: object       # model.GPTConfig
    base: object            # the base model's parameters
    base_eval_loss: float
    k: int                  # the budget in sequences
    hidden: np.ndarray      # [N, d_model] the base model's mean-pooled hidden states
    labels: object          # oracle.Labels
    scored: Scored
    progress: bool

    @cached_property
    def target_modes(self):
        """`selection.TargetModes` of the target set (one mode when only the gate is on),
        computed once per run from the base model's mean-pooled hidden states."""
        from mgd.pipeline import scorer as scorer_mod
        from mgd.pipeline.selection import fit_target_modes
        m = max(1, self.cfg.selection.target_modes)
        log.info(f"select: {m} mode{'s' if m > 1 else ''} of the target set")
        target = scorer_mod.extract_features(self.base, self.corpus.target_tokens, self.model_cfg,
                                             batch_size=self.cfg.scorer.feature_batch,
                                             progress=False)
        return fit_target_modes(target, self.hidden, m, seed=0)


# ---------------------------------------------------------------------------------------
# Parameters on disk (the base model alone is read by several stages, so it is stored
# by itself, apart from the training checkpoints).
# ---------------------------------------------------------------------------------------

def save_params(path, params) -> None:
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


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------

def corpus_stage(run_dir: Path, cfg: RunConfig):
    """The corpus (and, with `cfg.target`, the target rows from that file)."""
    from mgd.pipeline import corpus as corpus_mod
    c = cfg.corpus
    log.info("corpus: " + ("reusing" if (run_dir / "corpus" / "DONE").exists() else
                           f"building from {c.ontarget} + {c.offtarget}"))
    corpus = corpus_mod.build_corpus(c, run_dir)
    if cfg.target:
        corpus = dataclasses.replace(
            corpus, target_tokens=custom_target_stage(run_dir, corpus, cfg.target, c.n_target))
    return corpus


def custom_target_stage(run_dir, corpus, path: str, n_target: int) -> np.ndarray:
    """The --target file's documents, tokenized with the corpus tokenizer and packed into
    up to `n_target` rows the way the corpus packs its pools (stage `target`)."""
    from mgd.pipeline import corpus as corpus_mod
    from mgd.pipeline import sources
    st = artifacts.stage(run_dir, "target")
    if not st.done:
        texts = sources.read_source(path)
        if not texts:
            raise UsageError(f"--target {path}: no documents")
        enc = [e.ids for e in corpus.tokenizer.encode_batch(texts)]
        width = corpus.tokens.shape[1]
        available = sum(len(e) + 1 for e in enc) // width
        if available < 1:
            raise UsageError(f"--target {path}: its documents make less than one {width}-token row")
        rows, _, used = corpus_mod.pack_documents(enumerate(enc), min(n_target, available),
                                                  width, corpus.eot)
        log.info(f"target: {rows.shape[0]} rows from {len(used)} documents of {path}")
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "target.npz", target_tokens=rows)
            artifacts.atomic_write_json(tmp / "info.json", {"source": path, "rows": rows.shape[0],
                                                             "documents": len(used)})
    return artifacts.load_arrays(st.path / "target.npz")["target_tokens"]


def base_stage(run_dir: Path, cfg: RunConfig, corpus, model_cfg, progress: bool):
    """(base params, its eval loss, (mu, nu, count) of its Adam): pretraining on the
    mixed corpus. The oracle's inner Adam and the scorer's alignment columns continue
    from that Adam's moments."""
    import jax

    from mgd.pipeline.model import init_params
    from mgd.pipeline.train import adam_moments, eval_loss, train
    st = artifacts.stage(run_dir, "base")
    if not st.done:
        log.info("base: pretraining on the mixed corpus")
        params0 = init_params(model_cfg, jax.random.PRNGKey(0))
        base, base_log, base_opt = train(params0, corpus.tokens, model_cfg, cfg.base_train,
                                         ckpt_dir=run_dir / "_ckpt" / "base", progress=progress,
                                         return_opt_state=True)
        base_eval = eval_loss(base, corpus.eval_tokens, model_cfg, cfg.loss_batch)
        mu, nu, count = adam_moments(base_opt)
        with st as tmp:
            save_params(tmp / "params.npz", base)
            save_params(tmp / "adam_mu.npz", mu)
            save_params(tmp / "adam_nu.npz", nu)
            artifacts.atomic_write_json(tmp / "adam_count.json", {"count": int(count)})
            artifacts.atomic_write_json(tmp / "log.json", base_log)
            artifacts.atomic_write_json(tmp / "summary.json", {"eval_loss": base_eval})
        remove_tree(run_dir / "_ckpt" / "base")
    else:
        log.info("base: done, skipped")
    base = load_params(st.path / "params.npz", model_cfg)
    base_eval = artifacts.read_json(st.path / "summary.json")["eval_loss"]
    count = artifacts.read_json(st.path / "adam_count.json")["count"]
    adam = (load_params(st.path / "adam_mu.npz", model_cfg),
            load_params(st.path / "adam_nu.npz", model_cfg), np.int32(count))
    log.info(f"base: eval loss {base_eval:.4f}")
    return base, base_eval, adam


def oracle_stage(run_dir: Path, cfg: RunConfig, corpus, model_cfg, base, adam, progress: bool):
    """The metagradient labels on the oracle's pool of rows."""
    from mgd.pipeline.oracle import label
    final_lr = cfg.base_train.lr * cfg.base_train.min_lr_ratio
    if cfg.oracle.inner_lr > 0.5 * final_lr:
        # Far above the base run's final lr the inner steps leave its stable regime and
        # the labels can come out inverted (see docs/results.md).
        log.warning(f"oracle: inner_lr {cfg.oracle.inner_lr:g} is above half the base run's "
                    f"final lr ({final_lr:g}); 0.3x it is the tested setting")
    log.info("oracle: " + ("done, skipped" if (run_dir / "oracle" / "DONE").exists() else "labeling"))
    labels = label(base, corpus, model_cfg, cfg.oracle, run_dir, progress=progress, adam_state=adam)
    summary = artifacts.read_json(run_dir / "oracle" / "summary.json")
    log.info(f"oracle: {len(labels.indices)} rows labeled; target loss over the inner steps "
             f"{summary.get('phi0_mean', float('nan')):.4f} -> {summary['phi_mean']:.4f} "
             f"(rose in {summary.get('phi_rose_fraction') or 0:.0%} of rounds); label reliability "
             f"{summary.get('label_reliability') or float('nan'):.3f}")
    return labels


def features_stage(run_dir: Path, cfg: RunConfig, corpus, model_cfg, base, adam,
                   progress: bool) -> np.ndarray:
    """[N, d + 4 or d + 5] the scorer's features of every row: the base model's mean-pooled
    hidden state, its loss, the last layer's gradient alignment with the target (and with
    `scorer.gradient_alignment`, the whole model's)."""
    from mgd.pipeline import scorer as scorer_mod
    st = artifacts.stage(run_dir, "features")
    if not st.done:
        whole_model = cfg.scorer.gradient_alignment
        log.info("features: one forward pass over the corpus"
                 + (" (and a backward pass and a pass back through it, for the whole-model "
                    "gradient alignment)" if whole_model else ""))
        _, nu, count = adam
        direction = scorer_mod.target_direction(
            base, corpus.target_tokens, model_cfg, nu, count, b2=cfg.oracle.b2, eps=cfg.oracle.eps,
            parts="all" if whole_model else "last_layer")
        fn = (scorer_mod.features_with_gradient_alignment if whole_model
              else scorer_mod.features_with_loss_and_alignment)
        feats = scorer_mod.extract_features((base, direction), corpus.tokens, model_cfg,
                                            features_fn=fn, batch_size=cfg.scorer.feature_batch,
                                            progress=progress)
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "features.npz", features=feats)
    return artifacts.load_arrays(st.path / "features.npz")["features"]


def scorer_stage(run_dir: Path, cfg: RunConfig, feats: np.ndarray, labels) -> Scored:
    """Ridge and MLP fit to the oracle labels on the features; the winner scores every row."""
    from mgd.pipeline import scorer as scorer_mod
    st = artifacts.stage(run_dir, "scorer")
    sc = cfg.scorer
    if not st.done:
        log.info(f"scorer: fitting {' and '.join(sc.regressors)} to the oracle labels")
        fit = scorer_mod.fit_scorer(feats, labels.indices, labels.scores, seed=0,
                                    holdout_fraction=sc.holdout_fraction,
                                    regressors=tuple(sc.regressors), mlp_hidden=sc.mlp_hidden)
        feature_set = ("mean-pooled final hidden state + per-sequence loss + last-layer "
                       "gradient alignment with the target ("
                       + ", ".join(scorer_mod.ALIGNMENT_COLUMNS) + ")")
        if sc.gradient_alignment:
            feature_set += " + whole-model gradient alignment with the target"
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "scores.npz", scores=fit.scores,
                                         heldout_indices=fit.heldout_indices,
                                         heldout_labels=fit.heldout_labels,
                                         heldout_pred=fit.heldout_pred)
            artifacts.atomic_write_json(tmp / "summary.json",
                                        {**fit.summary(), "features": feature_set})
    summary = artifacts.read_json(st.path / "summary.json")
    arrays = artifacts.load_arrays(st.path / "scores.npz")
    log.info(f"scorer: {summary['winner']} wins, held-out Spearman "
             + ", ".join(f"{a} {b:.3f}" for a, b in summary["heldout_spearman"].items()))
    return Scored(scores=arrays["scores"], summary=summary,
                  heldout_labels=arrays["heldout_labels"], heldout_pred=arrays["heldout_pred"])


def remove_tree(path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)
