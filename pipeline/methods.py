"""The selection methods compared by a run, as a registry: method name -> a function of
the run's state that returns its selection. `selection_stage` runs one as a resumable
stage `select-<method>`.

A method with randomness of its own (random, the on-target oracle, DSIR's resampling,
perplexity correlations' population, the rule with a random score) draws once per
training seed, so the seeds measure its spread as well as training's.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mgd.pipeline import artifacts
from mgd.pipeline.config import OURS, RunConfig
from mgd.pipeline.stages import RunState

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """[n_draws, k] selected rows (one draw unless the method draws per seed), the
    arrays saved beside them, and what info.json says about them."""
    indices: np.ndarray
    arrays: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


SELECTORS: dict[str, Callable[[RunState], Selection]] = {}


def selector(name: str):
    """Register a method's selection function under `name`."""
    def register(fn):
        SELECTORS[name] = fn
        return fn
    return register


def distilled_rule(cfg: RunConfig) -> str:
    """The distilled selection's rule, in words."""
    modes, gate = cfg.selection.target_modes, cfg.selection.target_gate
    rule = (f"the score's top k in each of {modes} modes of the target set (quotas by the "
            f"target's shares)" if modes else "the score's top k")
    if gate:
        rule += (f"; rows farther from the target's modes than its own rows' {gate:g} "
                 f"quantile only when no other row is left")
    return rule


def rule_pick(state: RunState, scores, k: int) -> np.ndarray:
    """k rows by `scores` under the distilled selection's rule: the top k, or stratified by
    the target's modes and gated by likeness to the target, as the config asks."""
    from mgd.pipeline.selection import stratified_top_k, top_k
    sel = state.cfg.selection
    if not sel.target_modes and not sel.target_gate:
        return top_k(scores, k)
    fit = state.target_modes
    eligible = fit.typical(sel.target_gate) if sel.target_gate else None
    return stratified_top_k(scores, fit.mode_of_row, fit.share, k, eligible)


def distilled_pick(state: RunState, k: int) -> np.ndarray:
    """k rows by the distilled score under the distilled selection's rule."""
    return rule_pick(state, state.scored.scores, k)


def _rule_info(state: RunState) -> dict:
    sel = state.cfg.selection
    info: dict = {"rule": distilled_rule(state.cfg)}
    if sel.target_modes or sel.target_gate:
        fit = state.target_modes
        info["target_mode_share"] = [round(float(x), 4) for x in fit.share]
        if sel.target_gate:
            info["typical_rows"] = int(fit.typical(sel.target_gate).sum())
    return info


@selector(OURS)
def _distilled(state: RunState) -> Selection:
    return Selection(distilled_pick(state, state.k), {"scores": state.scored.scores},
                     _rule_info(state))


# ---------------------------------------------------------------------------------------
# Similarity to the target on the base model's features (baselines/similarity.py)
# ---------------------------------------------------------------------------------------

def nearest_target_scores(state: RunState) -> np.ndarray:
    return state.nearest_target_scores


@selector("nearest_target")
def _nearest_target(state: RunState) -> Selection:
    from mgd.pipeline.selection import top_k
    score = nearest_target_scores(state)
    return Selection(top_k(score, state.k), {"scores": score},
                     {"score": "cosine to the target set's mean hidden state"})


@selector("knn_target")
def _knn_target(state: RunState) -> Selection:
    from mgd.pipeline.baselines import similarity
    from mgd.pipeline.selection import top_k
    k_nn = min(state.cfg.selection.knn_k, state.target_hidden.shape[0])
    score = similarity.knn_scores(state.target_hidden, state.hidden, k_nn)
    return Selection(top_k(score, state.k), {"scores": score},
                     {"score": f"mean cosine to the {k_nn} nearest target rows", "knn_k": k_nn})


@selector("target_classifier")
def _target_classifier(state: RunState) -> Selection:
    from mgd.pipeline.baselines import similarity
    from mgd.pipeline.selection import top_k
    score = similarity.classifier_scores(state.target_hidden, state.hidden)
    return Selection(top_k(score, state.k), {"scores": score},
                     {"score": "P(target) of a logistic regression, target rows vs corpus rows"})


# ---------------------------------------------------------------------------------------
# Ablations: the distilled rule with another score, the distilled score without the rule
# ---------------------------------------------------------------------------------------

@selector("rule_nearest")
def _rule_nearest(state: RunState) -> Selection:
    score = nearest_target_scores(state)
    return Selection(rule_pick(state, score, state.k), {"scores": score},
                     {**_rule_info(state), "score": "nearest_target's cosine"})


@selector("rule_random")
def _rule_random(state: RunState) -> Selection:
    n = state.corpus.tokens.shape[0]
    scores = np.stack([np.random.default_rng(s).random(n) for s in range(state.cfg.seeds)])
    return Selection(np.stack([rule_pick(state, sc, state.k) for sc in scores]),
                     {"scores": scores},
                     {**_rule_info(state), "score": "uniform random, drawn per seed"})


@selector("distilled_topk")
def _distilled_topk(state: RunState) -> Selection:
    from mgd.pipeline.selection import top_k
    return Selection(top_k(state.scored.scores, state.k), {"scores": state.scored.scores},
                     {"rule": "the score's top k"})


@selector("oracle_labels")
def _oracle_labels(state: RunState) -> Selection:
    from mgd.pipeline.baselines import oracle_labels
    idx = oracle_labels.select(state.corpus.tokens.shape[0], state.labels.indices,
                               state.labels.scores, state.k)
    return Selection(idx, info={"labeled_rows": int(len(state.labels.indices))})


@selector("random")
def _random(state: RunState) -> Selection:
    from mgd.pipeline.baselines import random_subset
    n = state.corpus.tokens.shape[0]
    return Selection(np.stack([random_subset.select(n, state.k, seed=s)
                               for s in range(state.cfg.seeds)]))


@selector("oracle_ontarget")
def _oracle_ontarget(state: RunState) -> Selection:
    from mgd.pipeline.baselines import oracle_cluster
    return Selection(np.stack([oracle_cluster.select(state.corpus.cluster, state.k, seed=s)
                               for s in range(state.cfg.seeds)]))


@selector("low_perplexity")
def _low_perplexity(state: RunState) -> Selection:
    from mgd.pipeline.baselines import low_perplexity
    score = low_perplexity.scores(state.base, state.corpus.tokens, state.model_cfg,
                                  batch_size=state.cfg.loss_batch, progress=state.progress)
    return Selection(low_perplexity.select(score, state.k), {"scores": score})


@selector("dsir")
def _dsir(state: RunState) -> Selection:
    # The target text is the metagradient target set's, so DSIR sees what the other methods
    # see (never the evaluation set's documents).
    from mgd.pipeline.baselines import dsir
    cfg = state.cfg.baselines.dsir
    target_texts = state.corpus.decode(state.corpus.target_tokens)
    log.info("dsir: decoding the corpus and fitting hashed n-gram models (one process)")
    seeds = list(range(state.cfg.seeds)) if cfg.draw_per_seed else [0]
    idx, w = dsir.select_draws(state.corpus.texts_by_seq, target_texts, state.k, seeds,
                               work_dir=None, progress=state.progress, ngrams=cfg.ngrams,
                               num_buckets=cfg.num_buckets)
    return Selection(idx, {"log_importance_weights": w},
                     {"target_sequences": len(target_texts), "draws": len(seeds)})


@selector("ppl_correlations")
def _ppl_correlations(state: RunState) -> Selection:
    # One population per seed, like random's draws: the population is random (mixtures,
    # training order, domains) and its selection moves more with that than with training.
    from mgd.pipeline.baselines import ppl_correlations as pc
    idx, ests, errors = [], [], []
    for seed in range(state.cfg.seeds):
        x, y = population_stage(state, seed)
        est = pc.estimate(x, y, state.cfg.baselines.population.estimator)
        idx.append(pc.select(est, state.k))
        ests.append(est)
        errors.append(y.tolist())
    return Selection(np.stack(idx), {"estimate": np.stack(ests)}, {"target_error": errors})


def population_stage(state: RunState, seed: int = 0):
    """(per-sequence bits per byte [n_models, N], target error [n_models]) of the
    population drawn with the population seed + `seed` (stage `population` for seed 0,
    `population-s<seed>` for the others)."""
    from mgd.pipeline import continued as cont
    from mgd.pipeline.baselines import common
    from mgd.pipeline.baselines import ppl_correlations as pc
    from mgd.pipeline.train import train
    cfg, corpus, model_cfg = state.cfg, state.corpus, state.model_cfg
    st = artifacts.stage(state.run_dir, "population" if seed == 0 else f"population-s{seed}")
    if not st.done:
        log.info(f"ppl_correlations: training population {seed + 1} of {cfg.seeds}")
        pcfg = dataclasses.replace(cfg.baselines.population,
                                   seed=cfg.baselines.population.seed + seed)
        tcfg = cfg.baselines.population_train
        steps = cont.steps_for_budget(pcfg.rows_per_model, tcfg.batch_size, tcfg.epochs)
        domains = pc.unsupervised_domains(state.hidden, pcfg.n_domains, pcfg.seed)

        def train_fn(params, rows, seed):
            tc = dataclasses.replace(cont.train_config(tcfg, steps, seed), eval_every=0)
            return train(params, rows, model_cfg, tc, progress=False)[0]

        def loss_fn(params, seqs):
            return common.batched_losses(params, seqs, model_cfg, batch_size=cfg.loss_batch)

        nbytes = common.bytes_per_sequence(corpus.tokens, common.token_byte_lengths(corpus.tokenizer))
        x, y, mix = pc.build_population(state.base, corpus.tokens, corpus.target_tokens, domains,
                                        nbytes, pcfg, train_fn=train_fn, loss_fn=loss_fn,
                                        progress=state.progress)
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "population.npz", bpb=x.astype(np.float32),
                                         target_error=y, mixtures=mix, domains=domains)
    a = artifacts.load_arrays(st.path / "population.npz")
    return a["bpb"].astype(np.float64), a["target_error"]


def selection_stage(method: str, state: RunState) -> np.ndarray:
    """[n_draws, k'] selected rows for `method`, from its stage `select-<method>`."""
    st = artifacts.stage(state.run_dir, f"select-{method}")
    if not st.done:
        log.info(f"select: {method}")
        sel = SELECTORS[method](state)
        indices = np.atleast_2d(np.asarray(sel.indices, np.int64))
        with st as tmp:
            artifacts.atomic_save_arrays(tmp / "selection.npz", indices=indices, **sel.arrays)
            artifacts.atomic_write_json(tmp / "info.json", {"method": method, "k": state.k,
                                                             "selected": indices.shape[1],
                                                             **sel.info})
    return artifacts.load_arrays(st.path / "selection.npz")["indices"]
