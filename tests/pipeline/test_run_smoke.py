"""`mgd run`: option parsing, source resolution, and the smoke preset end to end on the
shared offline corpus, then a resume after deleting late stages."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mgd.cli import build_parser, main
from mgd.pipeline import presets
from mgd.pipeline.run import METHODS, build_plan, resolve_sources

from tests.pipeline.shared_data import DATA, needs_data


def test_cli_parses_every_option():
    a = build_parser().parse_args(
        ["run", "--preset", "demo", "--ontarget", "on.jsonl", "--offtarget", "off.jsonl.gz",
         "--target", "t.jsonl", "--out", "o", "--budget", "0.05", "--seeds", "4",
         "--attention-impl", "xla"])
    assert (a.preset, a.ontarget, a.offtarget, a.target, a.out, a.budget, a.seeds,
            a.attention_impl) == ("demo", "on.jsonl", "off.jsonl.gz", "t.jsonl", "o", 0.05, 4, "xla")


@pytest.mark.parametrize("setting", ["gradient_alignment", "per_unit_gradient"])
def test_cli_scorer_switches_reach_the_plan(setting):
    flag = "--" + setting.replace("_", "-")
    parse = lambda *a: getattr(build_parser().parse_args(["run", *a]), setting)  # noqa: E731
    assert (parse(), parse(flag), parse(flag.replace("--", "--no-"))) == (None, True, False)
    on = build_plan("smoke", ontarget="hf:a:b:c", offtarget="hf:d:e:f", **{setting: True})
    assert on["scorer"][setting] is True
    assert build_plan("smoke", ontarget="hf:a:b:c", offtarget="hf:d:e:f")["scorer"][setting] is False


def test_cli_target_modes_and_gate_reach_the_plan():
    from mgd.pipeline import presets
    parse = lambda *a: build_parser().parse_args(["run", *a])  # noqa: E731
    assert [parse(*a).target_modes for a in ((), ("--target-modes", "4"), ("--target-modes=0",))] \
        == [None, 4, 0]
    assert [parse(*a).target_gate for a in ((), ("--target-gate", "0.9"), ("--target-gate=0",))] \
        == [None, 0.9, 0.0]
    plan = lambda **kw: build_plan("smoke", ontarget="hf:a:b:c", offtarget="hf:d:e:f", **kw)  # noqa: E731
    smoke = presets.get("smoke")
    assert (plan()["target_modes"], plan()["target_gate"]) == (smoke.target_modes, smoke.target_gate)
    assert plan(target_modes=7)["target_modes"] == 7 and plan(target_gate=0.5)["target_gate"] == 0.5
    for bad in (-1, 65):                       # the smoke target set has 64 sequences
        with pytest.raises(ValueError, match="target-modes"):
            plan(target_modes=bad)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="target-gate"):
            plan(target_gate=bad)


@pytest.mark.parametrize("bad", [["--budget", "0"], ["--budget", "x"], ["--seeds", "0"],
                                 ["--preset", "huge"], ["--target-modes", "-1"],
                                 ["--target-gate", "1.5"], ["--target-gate", "x"]])
def test_cli_rejects_bad_options(bad, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", *bad])
    assert e.value.code == 2


def test_cli_names_a_missing_corpus_file(tmp_path, capsys):
    code = main(["run", "--preset", "smoke", "--ontarget", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "nope.jsonl" in capsys.readouterr().err


def test_sources_resolve_from_arguments_env_or_hub(tmp_path):
    (tmp_path / "ontarget.jsonl.gz").write_bytes(b"")
    (tmp_path / "offtarget.jsonl.gz").write_bytes(b"")
    assert resolve_sources(env={}) == (presets.HUB_ONTARGET, presets.HUB_OFFTARGET)
    env = {"MGD_DATA_DIR": str(tmp_path)}
    assert resolve_sources(env=env) == (str(tmp_path / "ontarget.jsonl.gz"),
                                        str(tmp_path / "offtarget.jsonl.gz"))
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"text": "x"}\n')
    assert resolve_sources(ontarget=mine, env=env)[0] == str(mine)
    with pytest.raises(FileNotFoundError, match="MGD_DATA_DIR"):
        resolve_sources(env={"MGD_DATA_DIR": str(tmp_path / "missing")})


def test_plan_applies_overrides_and_presets_are_complete():
    plan = build_plan("smoke", ontarget="hf:a:b:c", offtarget="hf:d:e:f", budget=2000, seeds=4,
                      attention_impl="xla")
    assert plan["budget"] == 2000.0 and plan["seeds"] == 4
    assert plan["model"]["attention_impl"] == "xla"
    assert plan["corpus"]["ontarget"] == "hf:a:b:c"
    for name in presets.PRESETS:
        p = presets.get(name)
        assert p.seeds >= 3 and p.budget == 0.10 and p.expected_time
        assert presets.PRESETS[name].__doc__
    # The CPU experiments' scale: the smoke corpus and scorer, a larger model and oracle.
    mid, smoke = presets.mid(), presets.smoke()
    assert "mid" not in presets.PRESETS and mid.name == "mid"
    assert (mid.corpus, mid.scorer) == (smoke.corpus, smoke.scorer) and mid.model["n_layer"] == 3
    assert build_plan(mid, ontarget="hf:a:b:c", offtarget="hf:d:e:f")["oracle"]["rounds"] == 96


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if not (DATA / "ontarget.jsonl.gz").exists():
        pytest.skip(f"shared corpus not found in {DATA} (set MGD_DATA_DIR)")
    out = tmp_path_factory.mktemp("smoke") / "run"
    env = {**os.environ, "MGD_DATA_DIR": str(DATA)}
    proc = subprocess.run([sys.executable, "-m", "mgd.cli", "run", "--preset", "smoke",
                           "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@needs_data
def test_smoke_preset_runs_every_stage_and_baseline(smoke_run):
    out, stdout = smoke_run
    for stage in ["corpus", "base", "oracle", "features", "scorer", "population", "report"]:
        assert (out / stage / "DONE").exists(), stage
    import pandas as pd
    df = pd.read_csv(out / "results.csv")
    assert sorted(df["method"].unique()) == sorted(METHODS)
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
    assert "eval_loss_mean" in stdout   # the summary table is printed at the end
    scorer = json.loads((out / "scorer" / "summary.json").read_text())
    assert set(scorer["heldout_spearman"]) == {"ridge", "mlp"}
    # Perplexity correlations draws its own population per seed, hence its own selection.
    from mgd.pipeline import artifacts
    for stage in ["population-s1", "population-s2"]:
        assert (out / stage / "DONE").exists(), stage
    draws = artifacts.load_arrays(out / "select-ppl_correlations" / "selection.npz")["indices"]
    assert draws.shape[0] == 3 and len({tuple(sorted(d)) for d in draws.tolist()}) > 1


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
    env = {**os.environ, "MGD_DATA_DIR": str(DATA)}
    proc = subprocess.run([sys.executable, "-m", "mgd.cli", "run", "--preset", "smoke",
                           "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {s: (out / s / "DONE").stat().st_mtime_ns for s in early} == stamps
    assert "base: done, skipped" in proc.stdout
    assert "continued: metagrad_distilled seed 2" in proc.stdout
    assert "continued: random seed 0" not in proc.stdout
    # Training is deterministic given the seed, so the redone stage reproduces its result.
    redone = json.loads((out / "continued-metagrad_distilled-s2" / "result.json").read_text())
    assert redone["eval_loss"] == pytest.approx(json.loads(before)["eval_loss"], rel=1e-5)
    # New results make the report stale: it is rebuilt.
    assert (out / "report" / "DONE").stat().st_mtime_ns > report_stamp


@needs_data
def test_a_different_setting_refuses_to_reuse_the_run_folder(smoke_run):
    out, _ = smoke_run
    with pytest.raises(ValueError, match="different settings"):
        from mgd.pipeline.run import run
        run("smoke", out=out, budget=0.2, ontarget=DATA / "ontarget.jsonl.gz",
            offtarget=DATA / "offtarget.jsonl.gz", quiet=True)


@needs_data
def test_target_file_becomes_the_target_rows(smoke_run, tmp_path):
    from mgd.pipeline.corpus import Corpus
    from mgd.pipeline.run import _custom_target_stage
    out, _ = smoke_run
    corpus = Corpus.load(out)
    docs = tmp_path / "target.jsonl"
    texts = ["Randomized trial of aspirin in patients with stable angina. " * 3,
             "Serum cholesterol and coronary risk in a cohort of 400 adults. " * 3]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rows = _custom_target_stage(tmp_path / "run", corpus, str(docs), 64, lambda m: None)
    width = corpus.tokens.shape[1]
    assert rows.ndim == 2 and rows.shape[1] == width and 1 <= rows.shape[0] <= 64
    # The rows are the file's text, tokenized with the corpus tokenizer.
    assert "aspirin" in corpus.decode(rows[:1])[0]
    again = _custom_target_stage(tmp_path / "run", corpus, str(docs), 64, lambda m: None)
    assert (again == rows).all()


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
    with pytest.raises(FileExistsError, match="variant"):
        copy_for_scorer_variant(out, variant)
    run("smoke", out=variant, ontarget=DATA / "ontarget.jsonl.gz",
        offtarget=DATA / "offtarget.jsonl.gz", gradient_alignment=True, quiet=True,
        methods=("metagrad_distilled", "random"))
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
def test_per_unit_gradient_variant_fits_the_scaled_labels_and_reports_against_the_labels(
        smoke_run, tmp_path):
    """Fit per unit of gradient norm: the scorer's held-out rows carry label / norm, the
    summary also gives the Spearman against the labels themselves, and the report's bar
    uses that one."""
    from mgd.pipeline import artifacts
    from mgd.pipeline.oracle import Labels
    from mgd.pipeline.run import copy_for_scorer_variant, run
    out, _ = smoke_run
    variant = tmp_path / "per-unit"
    copy_for_scorer_variant(out, variant)
    run("smoke", out=variant, ontarget=DATA / "ontarget.jsonl.gz",
        offtarget=DATA / "offtarget.jsonl.gz", per_unit_gradient=True, quiet=True,
        methods=("metagrad_distilled", "random"))
    labels = Labels.load(variant)
    scored = artifacts.load_arrays(variant / "scorer" / "scores.npz")
    norms = scored["labeled_grad_norms"]
    assert norms.shape == labels.scores.shape and (norms > 0).all() and np.ptp(norms) > 0
    scaled = dict(zip(labels.indices.tolist(), (labels.scores / norms).tolist()))
    np.testing.assert_allclose(scored["heldout_labels"],
                               [scaled[i] for i in scored["heldout_indices"].tolist()], rtol=1e-5)
    summary = json.loads((variant / "scorer" / "summary.json").read_text())
    assert summary["fit_target"].startswith("oracle label /")
    raw = dict(zip(labels.indices.tolist(), labels.scores.tolist()))
    from mgd.pipeline.scorer import spearman
    want = spearman(scored["heldout_pred"], [raw[i] for i in scored["heldout_indices"].tolist()])
    assert summary["heldout_spearman_vs_labels"] == pytest.approx(want)
    report = (variant / "report.md").read_text()
    assert f"{want:.3f}" in report.split("## Demo bar")[1].splitlines()[2]


@needs_data
@pytest.mark.parametrize("modes,gate", [(3, 0.0), (3, 0.5), (0, 0.5)])
def test_target_modes_and_gate_variants_shape_the_distilled_selection(smoke_run, tmp_path,
                                                                      modes, gate):
    """With target modes the distilled selection holds each mode's quota of the budget,
    filled by the score inside the mode; with the gate only rows like the target's own
    are taken while they last; the info and the report say which rule ran."""
    from mgd.pipeline import artifacts, selection
    from mgd.pipeline.run import copy_for_scorer_variant, distilled_rule, run
    out, _ = smoke_run
    variant = tmp_path / "variant"
    copy_for_scorer_variant(out, variant)
    run("smoke", out=variant, ontarget=DATA / "ontarget.jsonl.gz",
        offtarget=DATA / "offtarget.jsonl.gz", target_modes=modes, target_gate=gate,
        quiet=True, methods=("metagrad_distilled", "random"))
    plan = json.loads((variant / "plan.json").read_text())
    info = json.loads((variant / "select-metagrad_distilled" / "info.json").read_text())
    share = np.array(info["target_mode_share"])
    assert info["rule"] == distilled_rule(plan) and len(share) == max(modes, 1)
    assert share.sum() == pytest.approx(1, abs=1e-3) and (share > 0).all()
    picked = artifacts.load_arrays(variant / "select-metagrad_distilled" / "selection.npz")["indices"][0]
    scores = artifacts.load_arrays(variant / "scorer" / "scores.npz")["scores"]
    k = info["k"]
    assert len(set(picked.tolist())) == k
    # Not the plain top k: a quota or the gate reaches below it (else the rule did nothing).
    assert set(picked.tolist()) != set(selection.top_k(scores, k).tolist())
    if gate:
        from mgd.pipeline import scorer
        from mgd.pipeline.offline import load
        finished = load(variant)
        target = scorer.extract_features(finished.base, finished.corpus.target_tokens,
                                         finished.model_cfg, batch_size=plan["feature_batch"],
                                         progress=False)
        fit = selection.fit_target_modes(target, finished.features()[:, :finished.model_cfg.d_model],
                                         max(modes, 1))
        typical = fit.typical(gate)
        assert info["typical_rows"] == int(typical.sum())
        assert typical[picked].sum() == min(k, typical.sum())
    assert distilled_rule(plan) in (variant / "report.md").read_text()


@needs_data
def test_offline_retraining_reproduces_the_runs_own_result(smoke_run, tmp_path):
    """pipeline/offline.py, which the records in bench/results use: retraining the run's
    own distilled selection gives the run's own result, and the corpus rebuilt from the
    plan is the run's."""
    from mgd.pipeline import artifacts, offline
    out, _ = smoke_run
    run = offline.load(out)
    picked = artifacts.load_arrays(out / "select-metagrad_distilled" / "selection.npz")["indices"][0]
    want = artifacts.read_json(out / "continued-metagrad_distilled-s1" / "result.json")["eval_loss"]
    assert run.train(picked, 1) == pytest.approx(want, rel=1e-6)
    stats = artifacts.read_json(out / "corpus" / "stats.json")
    rebuilt = offline.rebuild_corpus(run.plan, DATA, tmp_path / "again", expected_stats=stats)
    np.testing.assert_array_equal(rebuilt.tokens, run.corpus.tokens)
    with pytest.raises(ValueError, match="differs from the run's"):
        offline.rebuild_corpus(run.plan, DATA, tmp_path / "other",
                               expected_stats={**stats, "n_sequences": -1})
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        offline.load(tmp_path)


@needs_data
def test_device_run_is_rebuilt_from_what_its_results_folder_keeps(smoke_run, tmp_path):
    """offline.rebuild_device_run reads a results folder laid out as `gpu_run.sh demo`
    returns it (the run's plan and corpus statistics, its labels and scores in a tgz)
    and gives back the run's own corpus, labels and scores."""
    import shutil
    import tarfile
    from mgd.pipeline import artifacts, offline
    out, _ = smoke_run
    call = tmp_path / "call"
    (call / "demo" / "summaries").mkdir(parents=True)
    shutil.copy(out / "plan.json", call / "demo" / "plan.json")
    shutil.copy(out / "corpus" / "stats.json", call / "demo" / "summaries" / "corpus_stats.json")
    with tarfile.open(call / "demo_labels.tgz", "w:gz") as tar:
        for name in ("oracle/labels.npz", "scorer/scores.npz"):
            tar.add(out / name, arcname=name)
    device = offline.rebuild_device_run(call, DATA, tmp_path / "work")
    run = offline.load(out)
    np.testing.assert_array_equal(device.corpus.tokens, run.corpus.tokens)
    np.testing.assert_array_equal(device.scores, run.distilled_scores().astype(np.float32))
    labels = artifacts.load_arrays(out / "oracle" / "labels.npz")
    for key in ("indices", "scores", "round_tau"):
        np.testing.assert_array_equal(device.labels[key], labels[key])
    assert device.plan == run.plan
