"""experiments/lean_round/profile_round.py: the round profiler's trace summary, on a GPU-shaped
trace written here and on a real CPU trace of a toy round."""
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[2] / "experiments" / "lean_round" / "profile_round.py"
_spec = importlib.util.spec_from_file_location("profile_round", _path)
prof = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prof)


def _meta(pid, name, tid=None):
    e = {"ph": "M", "pid": pid, "name": "process_name" if tid is None else "thread_name",
         "args": {"name": name}}
    return e if tid is None else {**e, "tid": tid}


def _x(pid, tid, name, ts, dur, hlo=None):
    e = {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}
    return {**e, "args": {"hlo_op": hlo}} if hlo else e


def _consistent(s):
    assert s["total_us"] == pytest.approx(sum(r["us"] for r in s["categories"]))
    assert s["total_us"] == pytest.approx(sum(r["us"] for r in s["threads"]))
    assert sum(r["share"] for r in s["categories"]) == pytest.approx(1.0)
    assert sum(r["count"] for r in s["categories"]) == s["events"]
    assert sum(r["us"] for r in s["top_ops"]) <= s["total_us"] + 1e-6
    assert all(r["us"] >= 0 for r in s["top_ops"] + s["top_stems"])


def test_gpu_shaped_trace_counts_stream_kernels_once_by_category(tmp_path):
    events = [
        _meta(1, "/host:CPU"), _meta(1, "python", tid=1),
        _meta(7, "/device:GPU:0"), _meta(7, "Stream #13(Compute)", tid=13),
        _meta(7, "Stream #21(MemcpyD2D)", tid=21), _meta(7, "XLA Ops", tid=99),
        _x(1, 1, "PjitFunction(jit(round_fn))", 0, 1000),                    # host: not counted
        _x(7, 13, "loop_add_fusion_3", 10, 40, "add_fusion.3"),
        _x(7, 13, "loop_add_fusion_4", 60, 20, "add_fusion.4"),
        _x(7, 13, "nvjet_hsh_192x192_64x4_2x1_v_bz_coopB_TNT", 100, 300, "custom-call.12"),
        _x(7, 13, "input_reduce_fusion", 400, 50, "reduce_fusion"),
        _x(7, 13, "mgd_attention_forward", 450, 100, "custom-call.3"),
        _x(7, 13, "kernel_17", 560, 10, "copy_fusion.2"),                    # named by its hlo_op
        _x(7, 21, "MemcpyDtoD", 500, 30),
        _x(7, 99, "add_fusion.3", 10, 40, "add_fusion.3"),                    # derived: a repeat
    ]
    trace = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    s = prof.summarize(prof.load_events(trace))
    assert s["source"] == "device" and s["events"] == 7
    assert s["total_us"] == pytest.approx(40 + 20 + 300 + 50 + 100 + 10 + 30)
    assert s["span_us"] == pytest.approx(570 - 10)
    cats = {r["name"]: r["us"] for r in s["categories"]}
    assert cats == pytest.approx({"gemm/cublas": 300, "custom-call/attention": 100, "fusion/elementwise": 60,
                                  "reduce": 50, "copy/transpose": 40})
    assert {r["name"]: r["count"] for r in s["top_stems"]}["loop_add_fusion"] == 2
    assert s["top_ops"][0]["hlo_op"] == "custom-call.12"
    assert {t["thread"] for t in s["threads"]} == {"Stream #13(Compute)", "Stream #21(MemcpyD2D)"}
    assert {r["name"]: r["us"] for r in s["attention_kinds"]} == {"forward": 100}
    _consistent(s)
    md = prof.to_markdown(s)
    assert "device kernels" in md and "| gemm/cublas | 0.300 | 54.5% | 1 |" in md


def test_attention_kernels_are_named_by_the_call_they_belong_to():
    kind = prof.attention_kind
    for name, want in (
            ("void mgd::fwd_kernel<mgd::FwdConfig<cutlass::bfloat16_t, 64> >(mgd::FwdParams", "forward"),
            ("void mgd::bwd_dkdv_kernel<mgd::BwdConfig<cutlass::bfloat16_t, 64>, (mgd::DqMode)0>",
             "backward"),
            ("void mgd::bwd_dq_convert_kernel<cutlass::bfloat16_t, 64>", "backward"),
            ("void mgd::sweep2_kernel<mgd::TileConfig<cutlass::bfloat16_t, 64> >", "double backward"),
            ("mgd_attention_forward", "forward"), ("mgd_attention_delta", "backward"),
            ("mgd_attention_backward_dkdv", "backward"),
            ("mgd_attention_double_backward_rows", "double backward"),
            ("attention_fwd", "forward"), ("attention_bwd_dq", "backward"),
            ("attention_dbwd_dkdv", "double backward"),
            ("gemm_fusion_dot_303", None), ("loop_add_fusion", None)):
        assert kind(name) == want, name


@pytest.mark.parametrize("impl", ["cuda+nope", "flash"])
def test_cli_refuses_an_unknown_implementation_in_one_line(impl, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        prof.main(["--shape", "toy:16", "--impl", impl, "--out", str(tmp_path)])
    assert exc.value.code != 0 and "--impl" in capsys.readouterr().err


def test_nested_ops_count_their_self_time():
    """A while op around its body's ops (as on the CPU backend): the body is not counted twice."""
    events = [_meta(1, "/host:CPU"), _x(1, 5, "while.3", 0, 100, "while.3"),
              _x(1, 5, "dot.1", 10, 30, "dot.1"), _x(1, 5, "end: dot.1", 40, 1),
              _x(1, 5, "fusion.2", 50, 40, "fusion.2"), _x(1, 5, "ThunkExecutor::Execute", 0, 200)]
    s = prof.summarize(events)
    assert s["source"] == "host"
    assert {r["name"]: r["us"] for r in s["top_ops"]} == pytest.approx(
        {"while.3": 30, "dot.1": 30, "fusion.2": 40})
    _consistent(s)


@pytest.mark.slow
def test_profile_of_a_toy_round_on_cpu(tmp_path):
    out = tmp_path / "profile"
    s = prof.profile("toy:16", "standin", "lean", rounds=1, out=out, top=10, hlo=True)
    assert s["source"] == "host" and s["events"] > 100 and s["total_us"] > 0
    assert len(s["top_ops"]) == 10 and s["wall_s"] > 0 and s["compile_s"] > 0
    _consistent(s)
    assert {p.name for p in out.iterdir()} == {"profile.json", "profile.md", "perfetto_trace.json.gz",
                                               "round_hlo.txt.gz"}
    # Every op's time lands under what it is for; the round's parts are all there.
    sources = {r["name"]: r["us"] for r in s["by_source"]}
    assert sum(sources.values()) == pytest.approx(s["total_us"])
    for part in ("matmuls (blocks)", "matmuls (output layer)", "norms", "Adam", "cross-entropy"):
        assert sources.get(part, 0) > 0, (part, sources)
    assert "## By source" in (out / "profile.md").read_text()
    assert json.loads((out / "profile.json").read_text())["total_us"] == pytest.approx(s["total_us"])
    assert "## By category" in (out / "profile.md").read_text()
    # The saved trace summarizes to the same numbers on its own (the --trace path).
    assert prof.main(["--trace", str(out / "perfetto_trace.json.gz"), "--out", str(tmp_path / "again"),
                      "--top", "10", "--hlo-text", str(out / "round_hlo.txt.gz")]) == 0
    again = json.loads((tmp_path / "again" / "profile.json").read_text())
    assert again["total_us"] == pytest.approx(s["total_us"]) and again["events"] == s["events"]
    assert {r["name"]: r["us"] for r in again["by_source"]} == pytest.approx(sources)


_HLO = """HloModule jit_round_fn

%fused_dot (p0: bf16[4,8], p1: bf16[8,8]) -> f32[4,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, metadata={stack_frame_id=3}
}

%fused_norm (p0: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %multiply.2 = f32[4,8]{1,0} multiply(%p0, %p0), metadata={stack_frame_id=2}
}

%fused_cast (p0: f32[4,8]) -> bf16[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %convert.3 = bf16[4,8]{1,0} convert(%p0)
}

ENTRY %main (a: bf16[4,8], b: bf16[8,8], c: f32[4,8]) -> f32[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  %c = f32[4,8]{1,0} parameter(2)
  %gemm_fusion_dot.7 = f32[4,8] fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={stack_frame_id=3}
  %loop_multiply_fusion.2 = f32[4,8]{1,0} fusion(%c), kind=kLoop, calls=%fused_norm
  %loop_convert_fusion = bf16[4,8]{1,0} fusion(%c), kind=kLoop, calls=%fused_cast
  ROOT %add.1 = f32[4,8]{1,0} add(%gemm_fusion_dot.7, %loop_multiply_fusion.2)
}

FileNames
1 "/work/pipeline/model.py"
FunctionNames
1 "_block"
2 "_rms_norm"
3 "token_losses.<locals>.chunk"
FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=1 function_name_id=2 line=20 end_line=20 column=1 end_column=2}
3 {file_name_id=1 function_name_id=3 line=30 end_line=30 column=1 end_column=2}
StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=1}
"""


def test_hlo_sources_reads_stacks_and_judges_fusions_by_what_they_hold():
    hs = prof.hlo_sources
    # Printed parent ids are one more than the parent's id: frame 2's parent is frame 1.
    assert hs.parse_frames(_HLO) == {1: ["_block"], 2: ["_rms_norm", "_block"],
                                     3: ["token_losses.<locals>.chunk"]}
    idx = hs.index(_HLO)
    assert idx["gemm_fusion_dot.7"] == "matmuls (output layer)"    # a dot under token_losses
    assert idx["gemm_fusion_dot_7"] == idx["gemm_fusion_dot.7"]     # the GPU kernel's name
    assert idx["loop_multiply_fusion.2"] == "norms"                 # from its body's stack
    assert idx["loop_convert_fusion"] == "casts"                    # no stack: by opcode
    s = prof.summarize([_meta(7, "/device:GPU:0"), _meta(7, "Stream #1", tid=1),
                        _x(7, 1, "gemm_fusion_dot_7", 0, 30), _x(7, 1, "loop_multiply_fusion_2", 40, 10),
                        _x(7, 1, "memcpy128", 60, 5)], sources=idx)
    assert {r["name"]: r["us"] for r in s["by_source"]} == pytest.approx(
        {"matmuls (output layer)": 30, "norms": 10,
         "unattributed (no HLO instruction of this name)": 5})
