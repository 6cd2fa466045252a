"""experiments/offline.py: a finished run loaded, its corpus rebuilt from its plan, its own
selection retrained to its own result, and a device run rebuilt from what its results
folder keeps. Not part of the library's suite: run it by hand with
`pytest experiments/tests` (it makes one smoke run, a few minutes on 2 CPU cores)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import offline  # noqa: E402

from tests.pipeline.shared_data import DATA, needs_data  # noqa: E402


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
def test_offline_retraining_reproduces_the_runs_own_result(smoke_run, tmp_path):
    """experiments/offline.py, which the records in experiments/ use: retraining the run's
    own distilled selection gives the run's own result, and the corpus rebuilt from the
    plan is the run's."""
    from mgd.pipeline import artifacts
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

    from mgd.pipeline import artifacts
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
