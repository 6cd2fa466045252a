"""`mgd run --dry-run [--devices N]`: the round program and each stage's expected time from
measured rates; the planner's and the launch's options as one-line errors."""
from __future__ import annotations

import re
import tomllib

import pytest

from mgd import cli
from mgd.pipeline import presets, stage_rates

HUB = ["--ontarget", "hf:a:b:c", "--offtarget", "hf:d:e:f"]


def _error(capsys, argv):
    assert cli.main(argv) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("[mgd ")]
    assert len(err) == 1 and err[0].startswith("mgd: "), err
    return err[0]


def _stage_line(out, stage):
    return next(x for x in out.splitlines() if re.match(rf"#\s+{stage}\s", x))


def test_demo_on_paper_splits_the_oracle_over_devices(capsys):
    """The demo's rates are measured: the oracle's time is its rounds per device times the
    measured seconds per round; the other stages do not shrink with more devices."""
    rate = stage_rates.rate_for("oracle", presets.demo())
    assert rate is not None and rate.unit == "round"
    times = {}
    for n in (1, 8):
        assert cli.main(["run", *HUB, "--preset", "demo", "--dry-run", "--devices", str(n)]) == 0
        out = capsys.readouterr().out
        tomllib.loads(out)     # the plan is comments: still a valid --config file
        line = _stage_line(out, "oracle")
        rounds = -(-256 // n)
        assert f"{rounds} rounds x {rate.seconds:.3g} s" in line
        times[n] = _stage_line(out, "base")
        assert "planned at run time on the device" in out and "keep_all" in out
    assert times[1] == times[8]


def test_full_preset_prints_unmeasured_never_a_guess(capsys):
    assert cli.main(["run", *HUB, "--preset", "full", "--dry-run", "--devices", "64"]) == 0
    out = capsys.readouterr().out
    for stage in ("base", "oracle", "features", "continued"):
        assert _stage_line(out, stage).endswith("unmeasured")
    assert "4096 rounds split over 64 devices: 64 per device" in out
    assert "nearest measured round" in out
    assert stage_rates.rate_for("oracle", presets.full()) is None


def test_a_changed_setting_makes_the_rate_unmeasured():
    cfg = presets.demo()
    assert stage_rates.rate_for("oracle", cfg) is not None
    changed = cfg.replace(oracle=cfg.oracle.__class__(**{**cfg.oracle.__dict__, "k": 128}))
    assert stage_rates.rate_for("oracle", changed) is None
    # The base model's rate does not depend on the oracle's settings.
    assert stage_rates.rate_for("base", changed) is not None


def test_memory_budget_turns_the_planner_on(capsys):
    assert cli.main(["run", *HUB, "--dry-run", "--memory-budget", "16GB"]) == 0
    cfg = tomllib.loads(capsys.readouterr().out)
    assert cfg["oracle"]["auto_plan"] is True and cfg["oracle"]["memory_budget"] == "16GB"


@pytest.mark.parametrize("argv,words", [
    (["--memory-budget", "lots"], "memory_budget"),
    (["--devices", "4"], "--devices: only with --dry-run"),
    (["--devices", "0", "--dry-run"], "--devices"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "below"),
    (["--coordinator", "h:1", "--num-processes", "2"], "--process-id"),
])
def test_bad_planner_and_launch_options_are_one_line(capsys, tmp_path, argv, words):
    line = _error(capsys, ["run", *HUB, "--out", str(tmp_path / "r"), *argv])
    assert words in line
    assert not (tmp_path / "r").exists()
