"""`mgd run --preset smoke` end to end on the shared offline corpus: every stage and
baseline, the results pinned to the committed fixture, a resume after deleting late
stages, the pinned plan refusing other settings, and the scorer variants."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mgd.errors import UsageError
from mgd.pipeline import presets
from mgd.pipeline.config import DEFAULT_METHODS, apply_overrides
from tests.pipeline.shared_data import DATA, needs_data

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_results.csv"

pytestmark = pytest.mark.slow


def _mgd_run(out, *extra, timeout=900):
    env = {**os.environ, "MGD_DATA_DIR": str(DATA)}
    proc = subprocess.run([sys.executable, "-m", "mgd.cli", "run", "--preset", "smoke",
                           "--out", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _smoke(**sections):
    """The smoke preset on the shared corpus, with `section.field` overrides."""
    cfg = apply_overrides(presets.smoke(), [("corpus.ontarget", str(DATA / "ontarget.jsonl.gz")),
                                            ("corpus.offtarget", str(DATA / "offtarget.jsonl.gz"))])
    return apply_overrides(cfg, list(sections.items()))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if not (DATA / "ontarget.jsonl.gz").exists():
        pytest.skip(f"shared corpus not found in {DATA} (set MGD_DATA_DIR)")
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = _mgd_run(out)
    return out, proc


@needs_data
def test_smoke_preset_runs_every_stage_and_baseline(smoke_run):
    out, proc = smoke_run
    for stage in ["corpus", "base", "oracle", "features", "scorer", "population", "report"]:
        assert (out / stage / "DONE").exists(), stage
    assert (out / "plan.json").exists()
    import pandas as pd
    df = pd.read_csv(out / "results.csv")
    assert sorted(df["method"].unique()) == sorted(DEFAULT_METHODS)
    assert (df.groupby("method").size() == 3).all()
    assert df["eval_loss"].notna().all() and (df["eval_loss"] > 0).all()
    # Same token budget for every method.
    assert df["tokens_trained"].nunique() == 1
    for png in ["eval_loss.png", "composition.png", "training_curves.png",
                "oracle_vs_predicted.png"]:
        assert (out / png).stat().st_size > 1000, png
    report = (out / "report.md").read_text()
    assert "Held-out Spearman" in report and "metagrad_distilled" in report
    assert "Label reliability" in report
    # The smoke checklist says, above its lines, that its bars are informational; so does
    # the run's last log line. The checklist holds DSIR.
    bar = report.split("## Demo bar")[1]
    assert bar.strip().startswith("These bars are set for the demo preset's scale")
    assert "- [" in bar and "eval loss below dsir" in bar
    log_lines = [line for line in proc.stderr.splitlines() if line.startswith("[mgd ")]
    assert "meaningful at the demo scale" in log_lines[-1]
    assert "eval_loss_mean" in proc.stdout   # the summary table is printed at the end
    scorer = json.loads((out / "scorer" / "summary.json").read_text())
    assert set(scorer["heldout_spearman"]) == {"ridge", "mlp"}
    # Perplexity correlations draws its own population per seed, hence its own selection.
    from mgd.pipeline import artifacts
    for stage in ["population-s1", "population-s2"]:
        assert (out / stage / "DONE").exists(), stage
    draws = artifacts.load_arrays(out / "select-ppl_correlations" / "selection.npz")["indices"]
    assert draws.shape[0] == 3 and len({tuple(sorted(d)) for d in draws.tolist()}) > 1


@needs_data
def test_smoke_results_are_pinned(smoke_run):
    """The smoke preset's results.csv against the one committed before the run config was
    typed (tests/pipeline/fixtures/smoke_results.csv).

    Selections (counts and cluster shares) must match exactly: a different selection is
    a real change. Losses carry a relative tolerance of 1e-5 only because XLA may sum in
    another order after a refactor of the oracle or the model (last-bit float noise
    through training); a real change moves a loss in its fourth decimal (> 2e-5
    relative at these losses of about 4.7) and fails.

    Except perplexity correlations: its selection ranks sequences by correlations over a
    population of small trained models, and XLA's CPU code (which depends on the host
    CPU's vector units) moves those losses by last bits that reorder near-ties; its rows
    are compared to within 10 of 150 selected rows and 0.5% in evaluation loss (the last
    training batch's loss, of other rows, is not compared).
    """
    import pandas as pd
    out, _ = smoke_run
    got = pd.read_csv(out / "results.csv").sort_values(["method", "seed"]).reset_index(drop=True)
    want = pd.read_csv(FIXTURE).sort_values(["method", "seed"]).reset_index(drop=True)
    assert list(got.columns) == list(want.columns)
    exact = ["method", "seed", "n_selected", "n_unique", "steps", "tokens_trained"]
    assert got[exact].equals(want[exact])
    shares = ["ontarget_share", "offtarget_share", "corrupt_share"]
    losses = ["eval_loss", "eval_ppl", "base_eval_loss", "final_train_loss"]
    host = (got["method"] == "ppl_correlations").to_numpy()
    assert host.sum() == 3
    np.testing.assert_allclose(got.loc[~host, shares], want.loc[~host, shares], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.loc[~host, losses], want.loc[~host, losses], rtol=1e-5, atol=0)
    np.testing.assert_allclose(got.loc[host, shares], want.loc[host, shares], rtol=0,
                               atol=10 / 150)
    evals = ["eval_loss", "base_eval_loss"]        # eval_ppl is exp of a scaled eval_loss
    np.testing.assert_allclose(got.loc[host, evals], want.loc[host, evals], rtol=5e-3, atol=0)


@needs_data
def test_rerun_skips_finished_stages_and_redoes_deleted_ones(smoke_run):
    import shutil
    out, _ = smoke_run
    early = ["corpus", "base", "oracle", "features", "scorer", "population", "select-dsir",
             "continued-random-s0"]
    stamps = {s: (out / s / "DONE").stat().st_mtime_ns for s in early}
    report_stamp = (out / "report" / "DONE").stat().st_mtime_ns
    before = (out / "continued-metagrad_distilled-s2" / "result.json").read_text()
    shutil.rmtree(out / "continued-metagrad_distilled-s2")
    proc = _mgd_run(out, timeout=600)
    assert {s: (out / s / "DONE").stat().st_mtime_ns for s in early} == stamps
    assert "base: done, skipped" in proc.stderr
    assert "continued: metagrad_distilled seed 2" in proc.stderr
    assert "continued: random seed 0" not in proc.stderr
    # Training is deterministic given the seed, so the redone stage reproduces its result.
    redone = json.loads((out / "continued-metagrad_distilled-s2" / "result.json").read_text())
    assert redone["eval_loss"] == pytest.approx(json.loads(before)["eval_loss"], rel=1e-5)
    # New results make the report stale: it is rebuilt.
    assert (out / "report" / "DONE").stat().st_mtime_ns > report_stamp


@needs_data
def test_a_different_setting_refuses_to_reuse_the_run_folder(smoke_run):
    from mgd.pipeline.run import run
    out, _ = smoke_run
    with pytest.raises(UsageError, match=r"different settings \(selection.budget_fraction\)"):
        run(_smoke(**{"selection.budget_fraction": 0.2}), out)


@needs_data
def test_target_file_is_split_into_target_and_evaluation_rows(smoke_run, tmp_path):
    from mgd.pipeline.corpus import Corpus
    from mgd.pipeline.stages import target_stage
    from mgd.pipeline.target import TargetTooSmall
    out, _ = smoke_run
    corpus = Corpus.load(out)
    docs = tmp_path / "target.jsonl"
    texts = ["Randomized trial of aspirin in patients with stable angina. " * 3,
             "Serum cholesterol and coronary risk in a cohort of 400 adults. " * 3]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = _smoke(target=str(docs))
    split, info = target_stage(tmp_path / "run", cfg, corpus)
    width = corpus.tokens.shape[1]
    assert split.target_tokens.shape[1] == split.eval_tokens.shape[1] == width
    assert info["documents"] == 2 and info["target_documents"] == info["eval_documents"] == 1
    # One document each: the rows are the file's text, tokenized with the corpus tokenizer,
    # and the two sets never share a document.
    first = [corpus.decode(rows[:1])[0] for rows in (split.target_tokens, split.eval_tokens)]
    assert sorted("aspirin" in f for f in first) == [False, True]
    assert sorted("cholesterol" in f for f in first) == [False, True]
    again, _ = target_stage(tmp_path / "run", cfg, corpus)
    assert (again.eval_tokens == split.eval_tokens).all()
    # The training corpus is untouched: the target only replaces the target and eval sets.
    assert (split.tokens == corpus.tokens).all()
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": texts[0]}) + "\n")
    with pytest.raises(TargetTooSmall, match="at least 2 documents"):
        target_stage(tmp_path / "run1", _smoke(target=str(one)), corpus)


@needs_data
def test_gradient_alignment_variant_reuses_the_labels_and_adds_one_column(smoke_run, tmp_path):
    """The variant a user runs after a finished run: its corpus, base model, labels and
    baselines copied, the scorer's stages redone with the whole-model column."""
    from mgd.pipeline import artifacts
    from mgd.pipeline.run import copy_for_scorer_variant, run
    out, _ = smoke_run
    variant = tmp_path / "variant"
    copy_for_scorer_variant(out, variant)
    assert not (variant / "features").exists() and (variant / "select-random").exists()
    with pytest.raises(UsageError, match="variant"):
        copy_for_scorer_variant(out, variant)
    run(_smoke(**{"scorer.gradient_alignment": True,
                  "selection.methods": "metagrad_distilled,random"}), variant, progress=False)
    before = artifacts.load_arrays(out / "features" / "features.npz")["features"]
    after = artifacts.load_arrays(variant / "features" / "features.npz")["features"]
    assert after.shape == (before.shape[0], before.shape[1] + 1)
    # The forward-pass columns are unchanged; the new one varies over the corpus.
    assert abs(after[:, :-1] - before).max() <= 1e-4 * abs(before).max()
    assert after[:, -1].std() > 0
    summary = json.loads((variant / "scorer" / "summary.json").read_text())
    assert "whole-model gradient alignment" in summary["features"]
    assert (variant / "oracle" / "DONE").exists() and (variant / "results.csv").exists()


@needs_data
@pytest.mark.parametrize("modes,gate", [(3, 0.0), (3, 0.5), (0, 0.5)])
def test_target_modes_and_gate_variants_shape_the_distilled_selection(smoke_run, tmp_path,
                                                                      modes, gate):
    """With target modes the distilled selection holds each mode's quota of the budget,
    filled by the score inside the mode; with the gate only rows like the target's own
    are taken while they last; the info and the report say which rule ran."""
    from mgd.pipeline import artifacts, scorer, selection
    from mgd.pipeline.corpus import Corpus
    from mgd.pipeline.model import GPTConfig
    from mgd.pipeline.run import copy_for_scorer_variant, distilled_rule, load_params, run
    out, _ = smoke_run
    variant = tmp_path / "variant"
    copy_for_scorer_variant(out, variant)
    cfg = _smoke(**{"selection.target_modes": modes, "selection.target_gate": gate,
                    "selection.methods": "metagrad_distilled,random"})
    run(cfg, variant, progress=False)
    info = json.loads((variant / "select-metagrad_distilled" / "info.json").read_text())
    share = np.array(info["target_mode_share"])
    assert info["rule"] == distilled_rule(cfg) and len(share) == max(modes, 1)
    assert share.sum() == pytest.approx(1, abs=1e-3) and (share > 0).all()
    picked = artifacts.load_arrays(variant / "select-metagrad_distilled" / "selection.npz")["indices"][0]
    scores = artifacts.load_arrays(variant / "scorer" / "scores.npz")["scores"]
    k = info["k"]
    assert len(set(picked.tolist())) == k
    # Not the plain top k: a quota or the gate reaches below it (else the rule did nothing).
    assert set(picked.tolist()) != set(selection.top_k(scores, k).tolist())
    if gate:
        corpus = Corpus.load(variant)
        model_cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=corpus.seq_len,
                              n_layer=1, n_head=2, d_model=32, compute_dtype="float32")
        base = load_params(variant / "base" / "params.npz", model_cfg)
        target = scorer.extract_features(base, corpus.target_tokens, model_cfg,
                                         batch_size=cfg.scorer.feature_batch, progress=False)
        hidden = artifacts.load_arrays(variant / "features" / "features.npz")["features"][:, :32]
        fit = selection.fit_target_modes(target, hidden, max(modes, 1))
        typical = fit.typical(gate)
        assert info["typical_rows"] == int(typical.sum())
        assert typical[picked].sum() == min(k, typical.sum())
    assert distilled_rule(cfg) in (variant / "report.md").read_text()


# ------------------------------------------------------------------ a target of the user's own

TARGET_DOCS = 300
TARGET_METHODS = ("metagrad_distilled", "random", "dsir", "nearest_target", "knn_target",
                  "target_classifier", "rule_nearest", "rule_random", "distilled_topk")


@pytest.fixture(scope="module")
def target_run(smoke_run, tmp_path_factory):
    """`mgd run --target FILE` with EBM-NLP abstracts from the shared on-target file (not in
    the smoke corpus, which reads that file's first 2,000 documents, all OHSUMED), the
    similarity baselines and the ablations, DSIR drawn per seed.

    The run starts from the default run's corpus and base model, copied: a target changes
    neither (the corpus's training rows and the base training are the same), only the
    stages after them, so the run saves the base training's time."""
    import shutil

    from mgd.pipeline import sources
    default, _ = smoke_run
    tmp = tmp_path_factory.mktemp("target")
    name = sources.resolve_source_name(str(DATA / "ontarget.jsonl.gz"), "EBM-NLP")
    docs = sources.read_jsonl(DATA / "ontarget.jsonl.gz", only_source=name)[:TARGET_DOCS]
    path = tmp / "ebm.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp / "run"
    out.mkdir()
    for stage in ("corpus", "base"):
        shutil.copytree(default / stage, out / stage)
    proc = _mgd_run(out, "--target", str(path), "--set",
                    f"selection.methods={','.join(TARGET_METHODS)}",
                    "--set", "baselines.dsir.draw_per_seed=true")
    return out, path, docs, proc


@needs_data
def test_target_run_evaluates_on_the_target_files_held_out_documents(smoke_run, target_run):
    import pandas as pd

    from mgd.pipeline import artifacts
    from mgd.pipeline.corpus import Corpus
    from mgd.pipeline.model import GPTConfig
    from mgd.pipeline.run import EVAL_SET_OF_TARGET, load_params
    from mgd.pipeline.train import eval_loss
    default, _ = smoke_run
    out, path, docs, proc = target_run
    info = json.loads((out / "target" / "info.json").read_text())
    assert info["file"] == str(path) and info["documents"] == TARGET_DOCS
    assert info["target_documents"] + info["eval_documents"] == TARGET_DOCS
    assert (info["target_rows"], info["eval_rows"]) == (64, 64)
    split = artifacts.load_arrays(out / "target" / "target.npz")
    assert not set(split["target_docs"].tolist()) & set(split["eval_docs"].tolist())
    # The evaluation rows are text of the held-out documents, none of the target's.
    corpus = Corpus.load(out)
    held_out = "\n".join(docs[d] for d in split["eval_docs"])
    in_target = "\n".join(docs[d] for d in split["target_docs"])
    for text in corpus.decode(split["eval_tokens"][:8]):
        piece = max(text.split("\n\n"), key=len)[:60]
        assert piece in held_out and piece not in in_target
    # Every method's loss and the base loss are measured on those rows.
    df = pd.read_csv(out / "results.csv")
    assert sorted(df["method"].unique()) == sorted(TARGET_METHODS)
    assert (df["eval_set"] == EVAL_SET_OF_TARGET).all()
    model_cfg = GPTConfig(vocab_size=corpus.vocab_size, seq_len=corpus.seq_len, n_layer=1,
                          n_head=2, d_model=32, compute_dtype="float32")
    base = load_params(out / "base" / "params.npz", model_cfg)
    want = eval_loss(base, split["eval_tokens"], model_cfg, 256)
    np.testing.assert_allclose(df["base_eval_loss"], want, rtol=1e-6)
    default_base = pd.read_csv(default / "results.csv")["base_eval_loss"].iloc[0]
    assert abs(want - default_base) > 1e-3
    report = (out / "report.md").read_text()
    assert str(path) in report and f"{TARGET_DOCS} documents" in report
    assert "(held-out documents of the target)" in report
    assert f"the other {info['eval_documents']} documents" in report
    # The corpus's on-target cluster is only a label for the composition columns.
    assert "a label for composition only" in report


@needs_data
def test_target_run_compares_every_method_by_a_paired_interval(target_run):
    import pandas as pd
    from scipy import stats

    from mgd.pipeline import artifacts
    from mgd.pipeline.config import ABLATIONS, OURS, SIMILARITY_BASELINES
    from mgd.pipeline.selection import top_k
    out, _, _, _ = target_run
    df = pd.read_csv(out / "results.csv")
    assert (df.groupby("method").size() == 3).all()
    wide = df.pivot(index="seed", columns="method", values="eval_loss")
    paired = pd.read_csv(out / "paired.csv", index_col="method")
    assert set(paired.index) == set(TARGET_METHODS) - {OURS}
    for m in paired.index:
        ci = stats.ttest_rel(wide[OURS], wide[m]).confidence_interval(0.95)
        np.testing.assert_allclose(paired.loc[m, ["diff_low", "diff_high"]],
                                   [ci.low, ci.high], rtol=0, atol=1e-12)
        want = "ahead" if ci.high < 0 else "behind" if ci.low > 0 else "not separated"
        assert paired.loc[m, "verdict"] == want
    report = (out / "report.md").read_text()
    bar = report.split("## Demo bar")[1].split("## Plots")[0]
    for m in ("dsir", *SIMILARITY_BASELINES):
        verdict = paired.loc[m, "verdict"]
        mark = "PASS" if verdict == "ahead" else "FAIL"
        assert f"[{mark}] eval loss below {m} (paired 95% interval" in bar
        assert f"seeds: {verdict}" in bar
    ablation = report.split("## Ablations")[1].split("## Paired comparison")[0]
    assert all(m in ablation for m in ABLATIONS)
    main = report.split("## Evaluation loss")[1].split("## Ablations")[0]
    assert not any(m in main for m in ABLATIONS)
    # DSIR and the rule with a random score draw per seed; the distilled top k is the
    # score's top k.
    for m in ("dsir", "rule_random"):
        draws = artifacts.load_arrays(out / f"select-{m}" / "selection.npz")["indices"]
        assert draws.shape[0] == 3 and len({tuple(d) for d in draws.tolist()}) == 3
    scores = artifacts.load_arrays(out / "scorer" / "scores.npz")["scores"]
    topk = artifacts.load_arrays(out / "select-distilled_topk" / "selection.npz")["indices"][0]
    assert set(topk.tolist()) == set(top_k(scores, len(topk)).tolist())
