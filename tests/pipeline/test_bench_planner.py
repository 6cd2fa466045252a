"""The planner benchmark's wiring on a CPU: a planned and a fixed program of a tiny round
give the same labels, and bad programs end in one line."""
import json
import subprocess
import sys

import pytest

from mgd.pipeline import bench_planner

TINY = ["--shape", "tiny", "--k", "4", "--seq-len", "16", "--inner-steps", "2",
        "--target-batch", "4", "--rounds-to-label", "2", "--repeats", "1", "--impl", "xla",
        "--compute-dtype", "float32"]


@pytest.mark.parametrize("text, expected", [
    ("auto", ("auto", None, None)), ("auto:16GB", ("auto", "16GB", None)),
    ("frugal:2", ("fixed", "frugal", 2)), ("lean:all", ("fixed", "lean", None))])
def test_parse_program(text, expected):
    assert bench_planner.parse_program(text) == expected


@pytest.mark.parametrize("text", ["auto:16XB", "nope:2", "frugal:0", "frugal:x", "frugal:3"])
def test_bad_program_is_one_line(text, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mgd.pipeline.bench_planner", "--programs", text,
                           "--out", str(tmp_path / "p.json")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--programs" in proc.stderr and "Traceback" not in proc.stderr


def test_planned_and_fixed_programs_agree(tmp_path):
    out = tmp_path / "planner.json"
    subprocess.run([sys.executable, "-m", "mgd.pipeline.bench_planner", "--out", str(out),
                    "--programs", "auto:1GB,frugal:2,lean:all", *TINY], check=True,
                   capture_output=True, text=True, timeout=600)
    runs = {r["program"]: r for r in json.loads(out.read_text())["runs"]}
    assert all(r["status"] == "ok" for r in runs.values()), runs
    plan = runs["auto:1GB"]["plan"]
    assert plan["budget_bytes"] == 10**9 and plan["chosen"] is not None
    assert plan["chosen_estimate_bytes"] <= 0.9 * 10**9
    # The program run is the program planned: XLA's analysis of it agrees with the plan's.
    assert runs["auto:1GB"]["estimate_gb"] * 1e9 == pytest.approx(plan["chosen_estimate_bytes"],
                                                                  rel=0.05)
    assert runs["frugal:2"]["micro_batch"] == 2 and runs["lean:all"]["micro_batch"] is None
    ref = runs["lean:all"]["tau_round0"]
    assert len(ref) == 4 and any(abs(x) > 0 for x in ref)
    for name in ("auto:1GB", "frugal:2"):
        assert runs[name]["tau_round0"] == pytest.approx(ref, rel=1e-2, abs=1e-6), name
        assert runs[name]["round_s"] > 0
