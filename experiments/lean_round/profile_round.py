"""Where one metagradient round's device time goes: a profile of the compiled round, by op.

    python experiments/lean_round/profile_round.py --shape e2e:16384 --impl standin --out DIR

builds the round `bench/round_timing.py` times (same builders, shape, plan), compiles it
and runs one warm-up round (compile excluded), then captures --rounds rounds under
`jax.profiler.trace(..., create_perfetto_trace=True)` and summarizes the trace with the
standard library: on a GPU the kernels on the device's streams (process `/device:GPU:N`,
threads `Stream #...`); where no device process exists (a CPU), the XLA CPU ops on the
host threads (events carrying `hlo_op`), said so in the summary. Times are self times
(a while op's body is not counted twice), so the op rows sum to the total.

Writes DIR/profile.md (tables), DIR/profile.json (the same numbers), DIR/perfetto_trace.json.gz
(open it at ui.perfetto.dev) and, with --hlo, DIR/round_hlo.txt.gz (the optimized HLO,
whose fusion names are the GPU kernels' names) and a table "By source": each op's time
under what it is for (matmuls of the blocks or the output layer, cross-entropy, norms,
rotary, Adam, carries, casts, copies; `hlo_sources.py` reads it from the HLO's source
stacks). XLA's GPU command buffers are turned off while profiling (kernels inside one
would carry the buffer's name, not their instruction's); --command-buffers keeps them.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hlo_sources  # noqa: E402  (the sibling module, whether run as a script or loaded by path)

# First match wins: our kernels name CUTLASS types, so they are tested first; a cuBLAS gemm
# is an XLA custom call, so gemm is tested before the other attention names.
CATEGORIES = (
    ("custom-call/attention", re.compile(r"mgd::")),
    ("gemm/cublas", re.compile(r"gemm|cublas|nvjet|xmma|cutlass|matmul|wgmma|\bdot|_dot|dot_|^dot|sm\d\d_")),
    ("custom-call/attention", re.compile(
        r"attention|flash|fmha|cudnn|pallas|mgd|fwd_kernel|bwd_dq|bwd_dkdv|bwd_preprocess|sweep\d_kernel"
        r"|custom.call|triton")),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|concatenate|dynamic.update.slice")),
    ("reduce", re.compile(r"reduc|scatter")),
    ("fusion/elementwise", re.compile(r"fusion|loop_|elementwise|wrapped_|convert|add|multiply|negate"
                                      r"|broadcast|select|exp|rsqrt|iota|compare|divide|subtract")),
)
OTHER = "other"

# Attention kernels by the call they belong to, for every backend's kernel names (ours,
# Pallas's `pallas_call` names, the Triton kernels'); the first match wins.
ATTENTION_KINDS = (
    ("double backward", re.compile(r"double_backward|sweep[123]_kernel|attention_dbwd")),
    ("backward", re.compile(r"attention_backward|attention_delta|attention_bwd|bwd_preprocess"
                            r"|bwd_dkdv|bwd_dq")),
    ("forward", re.compile(r"attention_forward|attention_fwd|fwd_kernel")),
)
# Lines the profiler derives from the streams (they repeat the stream's kernels).
_DERIVED = ("xla modules", "xla ops", "steps", "framework", "source code", "launch stats",
            "tensorflow ops", "xla traceme")
_SUFFIX = re.compile(r"([._]\d+)+$")


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if pattern.search(low):
            return cat
    return OTHER


def stem(name: str) -> str:
    """The op's name without XLA's numeric suffixes (loop_add_fusion_3 -> loop_add_fusion)."""
    return _SUFFIX.sub("", name) or name


def _self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, duration less that of the events nested in it) for one thread's events."""
    events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
    selfs = {id(e): float(e["dur"]) for e in events}
    stack: list[dict] = []
    for e in events:
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - 1e-9:
            stack.pop()
        if stack:                                        # nested in the top of the stack
            selfs[id(stack[-1])] -= min(float(e["dur"]), stack[-1]["ts"] + stack[-1]["dur"] - e["ts"])
        stack.append(e)
    return [(e, max(selfs[id(e)], 0.0)) for e in events]


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def attention_kind(name: str) -> str | None:
    """"forward", "backward" or "double backward" for an attention kernel's name, else None."""
    for kind, pattern in ATTENTION_KINDS:
        if pattern.search(name):
            return kind
    return None


def _source_of(name: str, hlo: str, sources: dict) -> str:
    for key in (hlo, name, name.replace(".", "_")):
        if key and key in sources:
            return sources[key]
    return "unattributed (no HLO instruction of this name)"


def summarize(events: list[dict], top: int = 30, sources: dict | None = None) -> dict:
    """Device ops (or, without a device, XLA CPU ops) by name, stem and category; times in us.
    With `sources` (hlo_sources.index of the round's HLO) also by what each op is for."""
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    device_pids = {p for p, n in procs.items() if n.startswith("/device:")}
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    if device_pids:
        source = "device"
        lines = {k: n for k, n in threads.items() if k[0] in device_pids}
        chosen = {k for k, n in lines.items() if "stream" in n.lower()}
        if not chosen:
            chosen = {k for k, n in lines.items() if not n.lower().startswith(_DERIVED)}
        for e in spans:
            key = (e["pid"], e.get("tid"))
            if e["pid"] in device_pids and (key in chosen or key not in lines):
                by_thread[key].append(e)
    else:
        source = "host"  # a CPU backend: the XLA ops executed on the host threads
        for e in spans:
            if "hlo_op" in e.get("args", {}) and not e["name"].startswith("end: "):
                by_thread[(e["pid"], e.get("tid"))].append(e)
    ops: dict[str, dict] = {}
    stems: dict[str, dict] = {}
    cats: dict[str, dict] = {}
    by_source: dict[str, dict] = {}
    kinds: dict[str, dict] = {}
    thread_rows = []
    first, last = None, None
    for key, evs in sorted(by_thread.items(), key=lambda kv: str(kv[0])):
        busy = 0.0
        for e, t in _self_times(evs):
            name = e["name"]
            hlo = e.get("args", {}).get("hlo_op", "")
            cat = category(name if category(name) != OTHER or not hlo else hlo)
            tables = [(ops, name), (stems, stem(name)), (cats, cat)]
            if sources is not None:
                tables.append((by_source, _source_of(name, hlo, sources)))
            kind = attention_kind(name)
            if kind is not None:
                tables.append((kinds, kind))
            for table, k in tables:
                row = table.setdefault(k, {"name": k, "us": 0.0, "count": 0, "category": cat})
                row["us"] += t
                row["count"] += 1
                if table is ops and hlo:
                    row["hlo_op"] = hlo
            busy += t
            first = e["ts"] if first is None else min(first, e["ts"])
            last = e["ts"] + e["dur"] if last is None else max(last, e["ts"] + e["dur"])
        thread_rows.append({"thread": threads.get(key, str(key[1])),
                            "process": procs.get(key[0], str(key[0])), "events": len(evs), "us": busy})
    total = sum(r["us"] for r in cats.values())

    def ranked(table, n):
        rows = sorted(table.values(), key=lambda r: -r["us"])[:n]
        for r in rows:
            r["share"] = r["us"] / total if total else 0.0
        return rows

    return {"source": source, "total_us": total, "span_us": (last - first) if spans and first is not None
            else 0.0, "events": sum(r["count"] for r in cats.values()), "threads": thread_rows,
            "categories": ranked(cats, len(cats)), "by_source": ranked(by_source, len(by_source)),
            "attention_kinds": ranked(kinds, len(kinds)),
            "top_ops": ranked(ops, top),
            "top_stems": ranked(stems, top), "distinct_ops": len(ops)}


def _table(rows, cols) -> list[str]:
    def cell(r, c):
        v = r.get(c, "")
        if c == "us":
            return f"{v / 1e3:.3f}"
        if c == "share":
            return f"{100 * v:.1f}%"
        return str(v).replace("|", "\\|")[:90]
    head = ["ms" if c == "us" else c for c in cols]
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows])


def to_markdown(s: dict) -> str:
    what = ("device kernels (GPU streams)" if s["source"] == "device" else
            "XLA CPU ops on the host threads (no device stream found in the trace)")
    lines = [f"# Round profile: {s.get('config', '')}", "",
             f"{what}; {s['events']} events, {s['distinct_ops']} distinct names.", "",
             f"- summed self time: {s['total_us'] / 1e3:.3f} ms over {s.get('rounds', '?')} round(s)"
             + (f", {s['total_us'] / 1e3 / s['rounds']:.3f} ms per round" if s.get("rounds") else ""),
             f"- span from first to last op: {s['span_us'] / 1e3:.3f} ms"]
    if s.get("wall_s") is not None:
        lines.append(f"- host wall time of the traced rounds: {1e3 * s['wall_s']:.3f} ms "
                     f"(untraced median {1e3 * s.get('untraced_s', 0):.3f} ms per round)")
    lines += ["", "## By category", ""] + _table(s["categories"], ("name", "us", "share", "count"))
    if s.get("attention_kinds"):
        lines += ["", "## Attention by kernel kind (share: of all device time)", ""]
        lines += _table(s["attention_kinds"], ("name", "us", "share", "count"))
    if s.get("by_source"):
        lines += ["", "## By source (what each op is for, from the HLO's source stacks)", ""]
        lines += _table(s["by_source"], ("name", "us", "share", "count"))
    lines += ["", "## Top ops by name", ""] + _table(s["top_ops"], ("name", "category", "us", "share",
                                                                     "count", "hlo_op"))
    lines += ["", "## Top ops by name stem (numeric suffixes dropped)", ""]
    lines += _table(s["top_stems"], ("name", "category", "us", "share", "count"))
    lines += ["", "## Threads counted", ""] + _table(s["threads"], ("process", "thread", "events", "us"))
    return "\n".join(lines) + "\n"


def profile(shape: str, impl: str, plan: str, rounds: int, out: Path, hlo: bool = False,
            top: int = 30) -> dict:
    """Compile, warm up, time a few untraced rounds, trace `rounds` rounds, summarize into `out`.
    `impl` may carry backend switches ("cuda+onecall", bench/round_timing.py)."""
    sys.path.insert(0, str(_ROOT))
    import jax

    from bench.round_timing import build_round, switches

    fn, args = build_round(shape, impl, plan)
    t0 = time.perf_counter()
    with switches(impl):                                     # read when the round traces
        compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    sources = None
    if hlo:
        text = compiled.as_text()
        with gzip.open(out / "round_hlo.txt.gz", "wt") as f:
            f.write(text)
        sources = hlo_sources.index(text)
    jax.block_until_ready(compiled(*args))                  # warm-up
    untraced = []
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        untraced.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(rounds):
                jax.block_until_ready(compiled(*args))
            wall = time.perf_counter() - t0
        traces = sorted(Path(tmp).rglob("perfetto_trace.json.gz"))
        if not traces:
            raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {tmp}")
        shutil.copy(traces[-1], out / "perfetto_trace.json.gz")
    summary = summarize(load_events(out / "perfetto_trace.json.gz"), top, sources)
    summary.update(config=f"{shape} {impl} {plan}", rounds=rounds, wall_s=wall,
                   xla_flags=os.environ.get("XLA_FLAGS", ""),
                   untraced_s=sorted(untraced)[len(untraced) // 2], compile_s=compile_s,
                   device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    (out / "profile.json").write_text(json.dumps(summary, indent=1))
    (out / "profile.md").write_text(to_markdown(summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="e2e:16384", help="name:seq_len (round_shapes.SHAPES)")
    ap.add_argument("--impl", default="standin",
                    help="pallas, standin, cuda, xla or triton, with backend switches after '+' "
                         "(cuda+onecall; bench/round_timing.py)")
    ap.add_argument("--plan", default="lean")
    ap.add_argument("--rounds", type=int, default=2, help="rounds traced after the warm-up")
    ap.add_argument("--top", type=int, default=30, help="rows of the by-name tables")
    ap.add_argument("--hlo", action="store_true", help="also write the optimized HLO (gzipped)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trace", type=Path, help="summarize this perfetto_trace.json.gz; run nothing")
    ap.add_argument("--hlo-text", type=Path,
                    help="with --trace: the round's round_hlo.txt.gz, for the by-source table")
    ap.add_argument("--command-buffers", action="store_true",
                    help="keep XLA's GPU command buffers (ops inside one are not attributed)")
    args = ap.parse_args(argv)
    if args.trace is not None:
        sources = None
        if args.hlo_text is not None:
            opener = gzip.open if str(args.hlo_text).endswith(".gz") else open
            with opener(args.hlo_text, "rt") as f:
                sources = hlo_sources.index(f.read())
        summary = summarize(load_events(args.trace), args.top, sources)
        summary["config"] = str(args.trace)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(summary, indent=1))
        (args.out / "profile.md").write_text(to_markdown(summary))
    else:
        if args.rounds < 1:
            ap.error(f"--rounds must be >= 1, got {args.rounds}")
        sys.path.insert(0, str(_ROOT))
        from bench.round_timing import parse_impl
        try:
            base, _ = parse_impl(args.impl)
        except ValueError as err:
            ap.error(f"--impl: {err}")
        if base not in ("pallas", "standin", "cuda", "xla", "triton"):
            ap.error(f"--impl: unknown implementation {base!r}")
        if not args.command_buffers:  # before JAX starts: its flags are read once
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + " --xla_gpu_enable_command_buffer=").strip()
        summary = profile(args.shape, args.impl, args.plan, args.rounds, args.out, args.hlo, args.top)
    print(to_markdown(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
