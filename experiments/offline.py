"""Working on a finished run after the fact: load what it made, rebuild its corpus from
its plan, and train other selections exactly as its methods were trained.

The records in `experiments/` ask questions of finished runs ("would this rule have
selected better?"); this is what they share, so that each asks only its question.
Nothing here writes into the run folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgd.pipeline import artifacts


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    plan: dict
    corpus: object          # corpus.Corpus
    model_cfg: object       # model.GPTConfig
    base: object            # the base model's parameters
    base_eval_loss: float
    k: int                  # the distilled selection's size: the budget in rows

    def distilled_scores(self) -> np.ndarray:
        return artifacts.load_arrays(self.run_dir / "scorer" / "scores.npz")["scores"].astype(
            np.float64)

    def features(self) -> np.ndarray:
        """The scorer's features of every row (the first d_model columns: the base
        model's mean-pooled final hidden state)."""
        feats = artifacts.load_arrays(self.run_dir / "features" / "features.npz")
        return np.asarray(feats["features"], np.float64)

    def mean_eval_loss(self, method: str) -> float:
        """The run's own result for `method`, mean over its seeds."""
        return float(np.mean([
            artifacts.read_json(self.run_dir / f"continued-{method}-s{s}" / "result.json")
            ["eval_loss"] for s in range(self.plan["seeds"])]))

    def train(self, indices, seed: int) -> float:
        """Evaluation loss after continued pretraining on rows `indices` with training
        seed `seed` and the run's own settings (as `run` trains each method)."""
        from mgd.pipeline import continued as cont
        result, _ = cont.continue_pretraining(
            self.base, self.corpus.tokens, indices, self.k, self.corpus.eval_tokens,
            self.model_cfg, cont.ContinuedConfig(**self.plan["continued"]), seed,
            progress=False, base_eval_loss=self.base_eval_loss)
        return result["eval_loss"]

    def train_seeds(self, indices) -> list[float]:
        """`train` for each of the run's seeds."""
        return [self.train(indices, seed) for seed in range(self.plan["seeds"])]


def load(run_dir) -> FinishedRun:
    """A finished run folder (plan, corpus, base model, distilled selection)."""
    from mgd.pipeline.corpus import Corpus
    from mgd.pipeline.model import GPTConfig
    from mgd.pipeline.run import load_params
    run_dir = Path(run_dir)
    if not (run_dir / "select-metagrad_distilled" / "DONE").exists():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no distilled selection)")
    plan = artifacts.read_json(run_dir / "plan.json")
    corpus = Corpus.load(run_dir)
    cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=corpus.seq_len, **plan["model"])
    return FinishedRun(
        run_dir=run_dir, plan=plan, corpus=corpus, model_cfg=cfg,
        base=load_params(run_dir / "base" / "params.npz", cfg),
        base_eval_loss=artifacts.read_json(run_dir / "base" / "summary.json")["eval_loss"],
        k=artifacts.read_json(run_dir / "select-metagrad_distilled" / "info.json")["k"])


def summary_line(run: str, rule: str, losses, **extra) -> str:
    """One JSON line of a record: the rule's evaluation loss, mean and spread over seeds."""
    return json.dumps({"run": run, "rule": rule,
                       "eval_loss_mean": round(float(np.mean(losses)), 4),
                       "eval_loss_std": round(float(np.std(losses, ddof=1)), 4), **extra})


def rebuild_corpus(plan: dict, data_dir, work_dir, expected_stats: dict | None = None):
    """The corpus of a run whose folder came back without its arrays (a device run),
    rebuilt from its plan and the local copies of its source files in `data_dir`
    (ontarget.jsonl.gz, offtarget.jsonl.gz); with `expected_stats` (the run's
    corpus/stats.json), a rebuild that differs from the run's is refused."""
    from mgd.pipeline.corpus import CorpusConfig, build_corpus
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    cfg = {**plan["corpus"], "ontarget": str(data_dir / "ontarget.jsonl.gz"),
           "offtarget": str(data_dir / "offtarget.jsonl.gz")}
    corpus = build_corpus(CorpusConfig(**cfg), work_dir)
    if expected_stats is not None:
        stats = artifacts.read_json(work_dir / "corpus" / "stats.json")
        if stats != expected_stats:
            raise ValueError(f"the corpus rebuilt in {work_dir} differs from the run's "
                             f"(its statistics do not match)")
    return corpus


@dataclass(frozen=True)
class DeviceRun:
    plan: dict
    corpus: object          # corpus.Corpus, rebuilt on this machine
    labels: dict            # the oracle's labels.npz arrays (indices, scores, rounds)
    scores: np.ndarray      # the distilled scorer's score of every row


def rebuild_device_run(call_dir, data_dir, work_dir, run: str = "demo") -> DeviceRun:
    """A device run as its committed results folder keeps it: `call_dir/<run>/plan.json`,
    `<run>/summaries/corpus_stats.json` and `<run>_labels.tgz` (what `gpu_run.sh demo`
    returns), with the corpus rebuilt in `work_dir` from the plan and the source files in
    `data_dir` and checked against the run's statistics (`rebuild_corpus`)."""
    import io
    import tarfile
    call_dir = Path(call_dir)
    plan = artifacts.read_json(call_dir / run / "plan.json")
    corpus = rebuild_corpus(plan, data_dir, work_dir, expected_stats=artifacts.read_json(
        call_dir / run / "summaries" / "corpus_stats.json"))
    with tarfile.open(call_dir / f"{run}_labels.tgz") as tar:
        def load(name):
            with np.load(io.BytesIO(tar.extractfile(name).read())) as z:
                return {k: z[k] for k in z.files}
        labels, scores = load("oracle/labels.npz"), load("scorer/scores.npz")["scores"]
    return DeviceRun(plan=plan, corpus=corpus, labels=labels, scores=scores)
