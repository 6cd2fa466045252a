"""The paired comparison over seeds against scipy's paired t-test, and the report that
judges every baseline by it."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mgd.pipeline import paired, report
from mgd.pipeline.config import ABLATIONS, OURS


@pytest.mark.parametrize("seed,n", [(0, 2), (1, 3), (2, 5), (3, 9)])
def test_interval_is_the_paired_t_interval(seed, n):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(4.7, 0.01, n), rng.normal(4.71, 0.01, n)
    mean, low, high = paired.paired_interval(a - b)
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert mean == pytest.approx(np.mean(a - b), abs=1e-12)
    assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_one_seed_has_no_interval():
    mean, low, high = paired.paired_interval([0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high)
    assert paired.verdict(low, high) == paired.NOT_SEPARATED


@pytest.mark.parametrize("low,high,want", [(-0.3, -0.1, "ahead"), (0.1, 0.2, "behind"),
                                           (-0.1, 0.1, "not separated")])
def test_verdict_is_ahead_only_when_the_interval_excludes_zero(low, high, want):
    assert paired.verdict(low, high) == want


def _results(rng, shifts, seeds=3):
    """Fake continued-pretraining results: per seed a shared offset, per method a shift."""
    offset = rng.normal(0, 0.01, seeds)
    rows = []
    for m, shift in shifts.items():
        for s in range(seeds):
            loss = 4.7 + offset[s] + shift + rng.normal(0, 0.0005)
            rows.append({"method": m, "seed": s, "eval_loss": loss, "eval_ppl": math.exp(loss),
                         "ontarget_share": 0.5, "offtarget_share": 0.5, "corrupt_share": 0.0})
    return rows


def test_paired_differences_match_scipy_per_method():
    rng = np.random.default_rng(11)
    shifts = {OURS: 0.0, "dsir": 0.01, "knn_target": 0.0, "random": -0.01}
    df = pd.DataFrame(_results(rng, shifts, seeds=4))
    got = paired.paired_differences(df, OURS)
    assert set(got.index) == {"dsir", "knn_target", "random"}
    wide = df.pivot(index="seed", columns="method", values="eval_loss")
    for m in got.index:
        ref = stats.ttest_rel(wide[OURS], wide[m]).confidence_interval(0.95)
        row = got.loc[m]
        assert row["seeds"] == 4
        assert (row["diff_low"], row["diff_high"]) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert got.loc["dsir", "verdict"] == "ahead" and got.loc["random", "verdict"] == "behind"


def test_report_judges_every_baseline_by_the_interval_and_shows_the_ablations(tmp_path):
    rng = np.random.default_rng(5)
    shifts = {OURS: 0.0, "dsir": 0.01, "nearest_target": 0.02, "knn_target": 0.0,
              "target_classifier": -0.01, "random": 0.05, "rule_nearest": 0.01,
              "rule_random": 0.03, "distilled_topk": 0.002}
    results = _results(rng, shifts)
    summary = report.write_report(tmp_path, results, logs={},
                                  selections={m: np.arange(2) for m in shifts},
                                  cluster=np.zeros(4, np.int8), out_dir=tmp_path,
                                  eval_set="held-out documents of the target")
    text = (tmp_path / "report.md").read_text()
    assert "(held-out documents of the target)" in text
    main = text.split("## Evaluation loss")[1].split("## Ablations")[0]
    ablation = text.split("## Ablations")[1].split("## Paired comparison")[0]
    assert all(m not in main for m in ABLATIONS) and "dsir" in main
    assert all(m in ablation for m in (OURS, *ABLATIONS)) and "dsir" not in ablation
    bar = dict((name.split(" (")[0], (mark, detail)) for name, mark, detail in
               report.bar_checks(summary, None, None, paired.paired_differences(
                   pd.DataFrame(results), OURS)))
    assert bar["eval loss below dsir"][0] is True
    assert bar["eval loss below nearest_target"][0] is True
    assert bar["eval loss below knn_target"][0] is False        # not separated
    assert bar["eval loss below target_classifier"][0] is False  # behind
    assert bar["eval loss below ppl_correlations"][0] is None    # not run
    assert "[FAIL] eval loss below knn_target" in text and "[PASS] eval loss below dsir" in text
    csv = pd.read_csv(tmp_path / "paired.csv", index_col="method")
    assert set(csv.index) == set(shifts) - {OURS}
