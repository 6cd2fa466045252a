"""Checks of the benchmark machinery itself (run in CI with the cpu_subset):
the FLOP count, the out-of-memory path, and the report on a real saved run."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

from bench import grid, harness, report
from bench import test_attention_kernels as kernels

pytestmark = pytest.mark.cpu_subset

SAVED_CPU_RUN = Path(__file__).parent / "fixtures" / "cpu_example.json"


def _fake_benchmark():
    """The fields of pytest-benchmark's fixture that the runner touches before timing."""
    return SimpleNamespace(name="test_fake", fullname="bench/test_fake", group=None,
                           extra_info={}, disabled=False)


def test_flops_follow_the_documented_convention():
    shape = grid.Shape(b=2, t=8, h=3, d=4, causal=False, dtype="bfloat16")
    # n_products * 2 * B * H * Tq * Tk * D
    assert grid.flops("double_backward", shape) == 12 * 2 * 2 * 3 * 8 * 8 * 4
    assert grid.flops("forward", shape) == 2 * 2 * 2 * 3 * 8 * 8 * 4
    causal = grid.Shape(b=2, t=8, h=3, d=4, causal=True, dtype="bfloat16")
    assert grid.flops("backward", causal) == 5 * 2 * 2 * 3 * 8 * 8 * 4 / 2
    with pytest.raises(ValueError, match="stage"):
        grid.flops("triple_backward", shape)


def test_grid_reads_the_environment(monkeypatch):
    monkeypatch.setenv("MGD_BENCH_T", "512, 2048")
    monkeypatch.setenv("MGD_BENCH_CAUSAL", "1,0")
    monkeypatch.setenv("MGD_BENCH_DTYPE", "float16")
    shapes = grid.gpu_shapes()
    assert sorted({(s.t, s.causal) for s in shapes}) == [
        (512, False), (512, True), (2048, False), (2048, True)]
    assert {s.dtype for s in shapes} == {"float16"}
    monkeypatch.setenv("MGD_BENCH_T", "1k")
    with pytest.raises(ValueError, match="MGD_BENCH_T"):
        grid.gpu_shapes()


def test_out_of_memory_is_recorded_then_skipped(monkeypatch):
    benchmark = _fake_benchmark()
    message = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 88.00GiB."

    def exhausted(*args):
        raise RuntimeError(message)

    monkeypatch.setattr(kernels, "_stage_function", lambda *a: jax.jit(exhausted))
    shape = grid.Shape(1, 32, 1, 16, True, "float32")
    before = len(harness.OOM_RECORDS)
    try:
        with pytest.raises(pytest.skip.Exception, match="out of memory"):
            kernels._bench(benchmark, "double_backward", "xla", shape)
        assert benchmark.extra_info["oom"] is True
        assert "RESOURCE_EXHAUSTED" in benchmark.extra_info["oom_message"]
        assert len(harness.OOM_RECORDS) == before + 1
        assert harness.OOM_RECORDS[-1]["extra_info"]["T"] == 32
    finally:
        del harness.OOM_RECORDS[before:]  # a fake point must not reach a saved run


def test_a_longer_length_is_not_attempted_after_out_of_memory(monkeypatch):
    """After T=32 ran out of memory, T=64 of the same stage, implementation and
    configuration is recorded as out of memory without a call; another head dim or
    a shorter T still runs."""
    calls = []

    def exhausted(*args):
        calls.append(args[0].shape)
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1GiB.")

    monkeypatch.setattr(kernels, "_stage_function", lambda *a: jax.jit(exhausted))
    before = len(harness.OOM_RECORDS)
    try:
        with pytest.raises(pytest.skip.Exception, match="out of memory"):
            kernels._bench(_fake_benchmark(), "double_backward", "xla",
                           grid.Shape(1, 32, 1, 16, True, "float32"))
        traced = len(calls)
        longer = _fake_benchmark()
        with pytest.raises(pytest.skip.Exception, match="already at T=32"):
            kernels._bench(longer, "double_backward", "xla", grid.Shape(1, 64, 1, 16, True, "float32"))
        assert len(calls) == traced  # never traced, compiled or called
        assert longer.extra_info["oom"] is True and longer.extra_info["oom_inferred_from_T"] == 32
        row = report._row(harness.OOM_RECORDS[-1], "run", oom=True)
        assert row["oom"] and row["oom_note"] == "T>=32"
        for other in (grid.Shape(1, 64, 1, 32, True, "float32"), grid.Shape(1, 16, 1, 16, True, "float32")):
            attempted = _fake_benchmark()
            with pytest.raises(pytest.skip.Exception, match="out of memory"):
                kernels._bench(attempted, "double_backward", "xla", other)
            assert "RESOURCE_EXHAUSTED" in attempted.extra_info["oom_message"]
            assert "oom_inferred_from_T" not in attempted.extra_info
        assert len(calls) > traced
    finally:
        del harness.OOM_RECORDS[before:]


def test_other_errors_are_not_swallowed(monkeypatch):
    benchmark = _fake_benchmark()
    def broken(*args):
        raise ValueError("a real bug")

    monkeypatch.setattr(kernels, "_stage_function", lambda *a: jax.jit(broken))
    with pytest.raises(ValueError, match="a real bug"):
        kernels._bench(benchmark, "forward", "xla", grid.Shape(1, 32, 1, 16, True, "float32"))


def test_report_on_a_saved_cpu_run(tmp_path):
    saved = json.loads(SAVED_CPU_RUN.read_text())
    # Add an out-of-memory point the way bench/conftest.py saves it.
    donor = next(b for b in saved["benchmarks"]
                 if b["extra_info"].get("stage") == "double_backward"
                 and b["extra_info"].get("impl") == "xla")
    oom_info = dict(donor["extra_info"], T=4096, oom=True, shape="b1-t4096-oom")
    oom_info.pop("compiled_bytes", None)
    saved["mgd_oom"] = [{"name": "test_double_backward[xla-oom]", "stats": None,
                         "extra_info": oom_info}]
    run = tmp_path / "run.json"
    run.write_text(json.dumps(saved))
    out = tmp_path / "report"
    assert report.main([str(run), "--out", str(out)]) == 0

    text = (out / "report.md").read_text()
    assert "## Attention kernels" in text and "## One metagradient round" in text
    rows = [line for line in text.splitlines() if line.startswith("| double_backward")]
    assert any("yes" in line and "b1-t4096-oom" in line for line in rows)
    figures = sorted(p.name for p in out.glob("*.png"))
    assert "double_backward_b1_h2_d32_causal_float32.png" in figures
    assert "metagradient_round.png" in figures

    frame = report.add_speedup(report.load([run]), ("xla",))
    timed = frame[~frame["oom"] & (frame["impl"] == "xla") & frame["stage"].isin(
        report.KERNEL_STAGES)]
    assert (timed["speedup"] - 1.0).abs().max() < 1e-12  # xla is its own best reference
    assert (timed["tflops"] > 0).all()


def test_report_rejects_a_file_that_is_not_a_run(tmp_path, capsys):
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit):
        report.main([str(bogus), "--out", str(tmp_path / "out")])
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err


def test_report_reads_the_jsonl_log(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("MGD_BENCH_JSONL", str(log))
    info = {"stage": "forward", "impl": "xla", "B": 1, "T": 64, "H": 1, "D": 16,
            "causal": True, "dtype": "float32", "flops": 1e6, "shape": "s"}
    harness.emit({"name": "a", "stats": {"median": 1e-3}, "extra_info": info})
    harness.emit({"name": "b", "stats": None, "extra_info": dict(info, T=128, oom=True)})
    frame = report.load([log])
    assert sorted(frame["oom"]) == [False, True]
    assert frame.loc[~frame["oom"], "tflops"].item() == pytest.approx(1e-3)


def test_commit_prefers_the_environment(monkeypatch):
    monkeypatch.setenv("MGD_COMMIT", "0123abcd")
    harness.commit.cache_clear()
    try:
        assert harness.commit() == "0123abcd"
    finally:
        harness.commit.cache_clear()


def test_report_on_end_to_end_rows_only(tmp_path):
    """A log holding only metagradient rounds (no B/H/D fields) still gets its table: per
    round shape, the speedup over the fastest reference and the stand-in's ceiling; two
    shapes at the same T are not mixed."""
    lines = []
    for impl, spec, median in (("xla", "e2e:512", 0.04), ("pallas", "e2e:512", 0.025),
                               ("cuda", "e2e:512", 0.02), ("standin", "e2e:512", 0.01),
                               ("pallas", "gpt2s:512", 0.10), ("cuda", "gpt2s:512", 0.08),
                               ("pallas", "e2e:1024", 0.05), ("cuda", "e2e:1024", 0.04)):
        t = int(spec.split(":")[1])
        lines.append(json.dumps({
            "name": f"test_metagradient_round[{impl}-{spec}]",
            "stats": {"median": median, "iqr": 0.001, "rounds": 5},
            "extra_info": {"stage": "metagradient_round", "impl": impl, "T": t,
                           "shape": spec, "compiled_bytes": 2 ** 30,
                           "gpu": "test", "commit": "abc"}}))
    log = tmp_path / "e2e.jsonl"
    log.write_text("\n".join(lines) + "\n")
    report.main([str(log), "--out", str(tmp_path / "out")])
    rows = {tuple(c.strip() for c in r.split("|")[1:3]): [c.strip() for c in r.split("|")[3:]]
            for r in (tmp_path / "out" / "report.md").read_text().splitlines()
            if r.startswith("| e2e:") or r.startswith("| gpt2s:")}
    # columns after shape and impl: median_ms, iqr_ms, speedup, ceiling, ...
    assert rows[("e2e:512", "cuda")][2:4] == ["1.25", "2.5"]     # 25/20 ms; 25/10 ms
    assert rows[("gpt2s:512", "cuda")][2:4] == ["1.25", ""]      # no stand-in for gpt2s
    assert rows[("e2e:1024", "cuda")][2] == "1.25"
    assert rows[("e2e:512", "standin")][3] == ""
    figures = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert figures == ["metagradient_round_e2e.png", "metagradient_round_gpt2s.png"]


def test_kernel_bars_report_judges_bars_from_the_cells():
    from bench.kernel_bars import Cell, _flop, report

    def cell(stage, impl, ms, d=128, t=8192, h=16):
        return Cell(stage, impl, h, d, t, ms, _flop(stage, h, d, t) / ms / 1e9)

    fwd_ms_at_550 = _flop("forward", 16, 128, 8192) / 550e9
    cells = [cell("forward", "cuda", fwd_ms_at_550 * 0.99), cell("forward", "pallas", 1.0),
             cell("forward", "cudnn", fwd_ms_at_550 * 0.9),
             cell("backward", "cuda", 2.0), cell("backward", "cuda-fused", 1.5),
             cell("backward", "triton", 3.0),
             cell("hvp", "cuda", 10.0), cell("hvp", "pallas", 14.0), cell("hvp", "triton", 15.0),
             Cell("hvp", "cuda", 16, 128, 4096, None, None, "OOM")]
    text = report(cells, {"gpu": "g", "commit": "c", "jax": "j", "date": "d"})
    assert "forward (16, 128) T=8192: 556 TF/s against 550: met" in text
    assert "0.91x cuDNN (bar 1.00x): missed" in text
    # The backward is judged by the faster of the two modes (fused, 1.5 ms): 2.00x triton.
    assert "| (16, 128) | 8192 | " in text and "| 2.00x |" in text
    assert "hvp (16, 128) T=8192: 1.40x the best reference against 1.45x: missed" in text
    assert "- hvp cuda (16, 128) T=4096: OOM" in text
