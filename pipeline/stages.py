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
    target_info: dict | None = None   # what a target of the run's own holds (target_stage)

    @cached_property
    def target_hidden(self) -> np.ndarray:
        """[n_target, d_model] the base model's mean-pooled hidden states of the target set
        (the features `hidden` holds for the corpus)."""
        from mgd.pipeline import scorer as scorer_mod
        return scorer_mod.extract_features(self.base, self.corpus.target_tokens, self.model_cfg,
                                           batch_size=self.cfg.scorer.feature_batch,
                                           progress=False)

    @cached_property
    def nearest_target_scores(self) -> np.ndarray:
        """[N] each corpus row's cosine to the target set's mean hidden state (read by
        nearest_target and rule_nearest, computed once)."""
        from mgd.pipeline.baselines import similarity
        return similarity.nearest_scores(self.target_hidden, self.hidden)

    @cached_property
    def target_modes(self):
        """`selection.TargetModes` of the target set (one mode when only the gate is on),
        computed once per run from the base model's mean-pooled hidden states."""
        from mgd.pipeline.selection import fit_target_modes
        m = min(max(1, self.cfg.selection.target_modes), self.corpus.target_tokens.shape[0])
        log.info(f"select: {m} mode{'s' if m > 1 else ''} of the target set")
        return fit_target_modes(self.target_hidden, self.hidden, m, seed=0)


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
    """The corpus: its clusters, and its own held-out target and evaluation sets."""
    from mgd.pipeline import corpus as corpus_mod
    c = cfg.corpus
    log.info("corpus: " + ("reusing" if (run_dir / "corpus" / "DONE").exists() else
                           f"building from {c.ontarget} + {c.offtarget}"
                           + (f" (without on-target source {c.target_source!r})"
                              if c.target_source else "")))
    try:
        return corpus_mod.build_corpus(c, run_dir)
    except corpus_mod.DocumentsRanOut as err:
        without = f" without source {c.target_source!r}" if c.target_source else ""
        raise corpus_mod.DocumentsRanOut(
            f"corpus: the on-target or off-target source{without} is too small for the asked "
            f"sizes ({err}); lower corpus.n_ontarget, n_offtarget or n_corrupt") from None


def target_spec(cfg: RunConfig) -> tuple[str, str, str | None] | None:
    """(option, file, source) of the run's own target: a --target file, or one source of
    the on-target file; None when the target is the corpus's held-out on-target set."""
    if cfg.target:
        return "--target", cfg.target, None
    if cfg.corpus.target_source:
        return "--target-source", cfg.corpus.ontarget, cfg.corpus.target_source
    return None


def target_stage(run_dir: Path, cfg: RunConfig, corpus):
    """(corpus, info): with a target of the run's own (`target_spec`), the corpus with its
    target and evaluation sets replaced by the target's documents split by document
    (`target.split_documents`, stage `target`), and what the split holds; else the
    corpus as it is and None."""
    from mgd.pipeline import sources
    from mgd.pipeline.target import split_documents
    spec = target_spec(cfg)
    if spec is None:
        return corpus, None
    option, path, source = spec
    st = artifacts.stage(run_dir, "target")
    if not st.done:
        texts = sources.read_source(path, limit=cfg.corpus.max_docs, only_source=source)
        enc = [e.ids for e in corpus.tokenizer.encode_batch(texts)]
        split = split_documents(enc, cfg.corpus.n_target, cfg.corpus.n_eval,
                                corpus.tokens.shape[1], corpus.eot, seed=cfg.corpus.seed,
                                name=f"{option} {source or path}")
        where = str(path).partition("#")[0]
        info = {"option": option, "file": where, "source": source,
                **split.summary(len(texts))}
        log.info(f"target: {info['documents']} documents of "
                 + (f"source {source!r} of " if source else "") + f"{where}: target set "
                 f"{info['target_rows']} rows from {info['target_documents']} documents, "
                 f"evaluation set {info['eval_rows']} rows from {info['eval_documents']}")
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "target.npz", target_tokens=split.target_tokens,
                                         eval_tokens=split.eval_tokens,
                                         target_docs=split.target_docs, eval_docs=split.eval_docs)
            artifacts.atomic_write_json(tmp / "info.json", info)
    a = artifacts.load_arrays(st.path / "target.npz")
    info = artifacts.read_json(st.path / "info.json")
    # -1: these rows come from the target's documents, which the on-target ids do not index.
    corpus = dataclasses.replace(
        corpus, target_tokens=a["target_tokens"], eval_tokens=a["eval_tokens"],
        target_doc_id=np.full(a["target_tokens"].shape[0], -1, np.int64),
        eval_doc_id=np.full(a["eval_tokens"].shape[0], -1, np.int64))
    return corpus, info


def target_eval_stage(run_dir: Path, cfg: RunConfig, corpus, model_cfg, base,
                      base_eval: float) -> float:
    """The base model's eval loss on a target of the run's own evaluation set (stage
    `target-eval`), computed once and recomputed only when its inputs change (the
    evaluation rows, the base model as fingerprinted by its own eval loss, loss_batch)."""
    import hashlib

    from mgd.pipeline.train import eval_loss
    rows = np.ascontiguousarray(corpus.eval_tokens)
    key = {"eval_tokens_sha256": hashlib.sha256(rows.tobytes()).hexdigest(),
           "eval_shape": list(rows.shape), "base_eval_loss": float(base_eval),
           "loss_batch": cfg.loss_batch}
    st = artifacts.stage(run_dir, "target-eval")
    if st.done and artifacts.read_json(st.path / "summary.json").get("key") != key:
        remove_tree(st.path)
    if not st.done:
        loss = eval_loss(base, corpus.eval_tokens, model_cfg, cfg.loss_batch)
        with st as tmp:
            artifacts.atomic_write_json(tmp / "summary.json", {"eval_loss": float(loss), "key": key})
    loss = artifacts.read_json(st.path / "summary.json")["eval_loss"]
    log.info(f"base: eval loss on the target's held-out documents {loss:.4f}")
    return loss


def describe_target(info: dict | None, corpus) -> tuple[str, str]:
    """(the target, the evaluation set), in words for the report."""
    if info is None:
        t, e = corpus.stats["target"], corpus.stats["eval"]
        return (f"held-out on-target documents ({t['documents']} documents, "
                f"{t['sequences']} sequences)",
                f"held-out on-target documents ({e['documents']} documents, {e['sequences']} "
                f"sequences; none in the corpus or the target set)")
    where = (f"source {info['source']!r} of {info['file']}" if info["source"]
             else f"the target file {info['file']}")
    target = (f"{where}: {info['documents']} documents, split by document; the target set "
              f"is {info['target_rows']} sequences from {info['target_documents']} of them")
    evals = (f"held-out documents of {where}: {info['eval_rows']} sequences from the other "
             f"{info['eval_documents']} documents (none in the target set; the corpus's "
             f"on-target cluster is a label for composition only)")
    return target, evals


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
    if summary.get("round_program"):
        log.info(f"oracle: round program {summary['round_program']}")
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
