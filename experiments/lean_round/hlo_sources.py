"""What each instruction of an optimized HLO module is for, read from the source stack JAX
records in its metadata: the categories the lean-round issue asks the time outside
attention to be broken down by (matmuls, cross-entropy, norms and rotary, Adam and the
carry stacks, casts and copies).

    index = hlo_sources.index(compiled.as_text())
    index["loop_add_fusion.39"]   # -> "norms", say

The HLO text ends with JAX's source tables (FileNames, FunctionNames, FileLocations,
StackFrames); an instruction's `stack_frame_id` is its innermost frame, and the chain of
parent frames names the functions of `mgd.pipeline` (and optax) it came from. A fusion is
judged by what it holds: a dot makes it a matmul (of the output layer when
`token_losses` is on its stack), otherwise the first function on the stacks of its
instructions that names a category, otherwise its opcodes (dynamic-update-slice: carries
and stacks; convert: casts; copy or transpose: copies).
"""
from __future__ import annotations

import linecache
import re
from collections import Counter

__all__ = ["CATEGORIES", "index", "parse_frames", "normalize"]

# (category, pattern) in priority order, tried on each frame of an instruction's stack
# (innermost first): on the function's name, then on its source line (JAX keeps only user
# frames, so `jax.nn.gelu` shows as the model line that calls it).
FUNCTION_RULES = (
    ("attention", re.compile(r"_standin_attention|^_attention$|mgd\.op|attention_(forward|backward)")),
    ("cross-entropy", re.compile(r"^token_losses|logsumexp|map_token_chunks")),
    ("norms", re.compile(r"^_rms_norm$")),
    ("rotary", re.compile(r"^_rotary$")),
    ("MLP activation", re.compile(r"^gelu$")),
    ("Adam", re.compile(r"adam|update_moment|safe_increment|apply_updates|^scale\.|chain\.|_inner_update"
                        r"|bias_correction")),
    ("embedding", re.compile(r"^_embed$")),
)
LINE_RULES = (
    ("attention", re.compile(r"_attention\(")),
    ("norms", re.compile(r"_rms_norm\(")),
    ("rotary", re.compile(r"_rotary\(")),
    ("MLP activation", re.compile(r"gelu")),
    ("cross-entropy", re.compile(r"token_losses\(|logsumexp")),
    ("casts", re.compile(r"\.astype\(")),
)
CATEGORIES = ("matmuls (blocks)", "matmuls (output layer)") + tuple(c for c, _ in FUNCTION_RULES) + (
    "carries and stacks", "casts", "copies and transposes", "other")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_DOT = {"dot", "convolution"}


def normalize(name: str) -> str:
    """An HLO name as a GPU kernel is named after it ("loop_add_fusion.39" -> "loop_add_fusion_39")."""
    return re.sub(r"[.\-]", "_", name)


def _table(text: str, name: str) -> dict[int, str]:
    start = text.find("\n" + name + "\n")
    rows: dict[int, str] = {}
    if start < 0:
        return rows
    for line in text[start + len(name) + 2:].splitlines():
        m = re.match(r"(\d+) (.*)$", line)
        if not m:
            break
        rows[int(m.group(1))] = m.group(2)
    return rows


def parse_frames(text: str, with_lines: bool = False) -> dict[int, list]:
    """stack frame id -> function names, innermost first (JAX's tables at the end of the text);
    with_lines: (function name, source line text) pairs, the text read from the file where
    it exists here ("" elsewhere).

    A frame's printed parent_frame_id is one more than its parent's id (0: none)."""
    functions = {k: v.strip('"') for k, v in _table(text, "FunctionNames").items()}
    files = {k: v.strip('"') for k, v in _table(text, "FileNames").items()}
    locations = {}
    for k, v in _table(text, "FileLocations").items():
        fields = dict(re.findall(r"(\w+)=(\d+)", v))
        if "function_name_id" in fields:
            fn = functions.get(int(fields["function_name_id"]), "?")
            path = files.get(int(fields.get("file_name_id", 0)), "")
            line = linecache.getline(path, int(fields.get("line", 0))).strip() if path else ""
            locations[k] = (fn, line) if with_lines else fn
    frames = {}
    for k, v in _table(text, "StackFrames").items():
        loc = re.search(r"file_location_id=(\d+)", v)
        parent = re.search(r"parent_frame_id=(\d+)", v)
        frames[k] = (locations.get(int(loc.group(1)), ("?", "") if with_lines else "?") if loc
                     else ("?", "") if with_lines else "?",
                     int(parent.group(1)) - 1 if parent else 0)
    chains = {}
    for k in frames:
        chain, seen, cur = [], set(), k
        while cur in frames and cur not in seen:
            seen.add(cur)
            fn, parent = frames[cur]
            chain.append(fn)
            cur = parent
        chains[k] = chain
    return chains


def _by_function(chain: list[tuple[str, str]]) -> str | None:
    for fn, line in chain:
        short = fn.split(".<locals>.")[-1]
        for category, pattern in FUNCTION_RULES:
            if pattern.search(fn) or pattern.search(short):
                return category
        for category, pattern in LINE_RULES:
            if line and pattern.search(line):
                return category
    return None


def _instructions(text: str):
    """(computation, instruction name, opcode, called computations, frame id) per line."""
    comp = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            comp = m.group(1)
            continue
        if line.startswith("}"):
            comp = None
            continue
        m = _INSTR.match(line)
        if m and comp is not None:
            frame = _FRAME.search(line)
            yield (comp, m.group(1), m.group(2), _CALLS.findall(line),
                   int(frame.group(1)) if frame else None)


def index(text: str) -> dict[str, str]:
    """Category of every instruction of the module, keyed by its HLO name and by the name a
    GPU kernel gets from it (dots and dashes as underscores)."""
    chains = parse_frames(text, with_lines=True)
    rows = list(_instructions(text))
    by_comp: dict[str, list] = {}
    for comp, name, op, calls, frame in rows:
        by_comp.setdefault(comp, []).append((name, op, calls, frame))

    def contents(comp, depth=0):
        """Opcodes and frame chains inside a called computation, nested calls included."""
        ops, chains_in = Counter(), []
        for _, op, calls, frame in by_comp.get(comp, ()):
            ops[op] += 1
            if frame is not None:
                chains_in.append(chains.get(frame, []))
            if depth < 4:
                for c in calls:
                    o, ch = contents(c, depth + 1)
                    ops.update(o)
                    chains_in += ch
        return ops, chains_in

    out: dict[str, str] = {}
    for comp, name, op, calls, frame in rows:
        own = chains.get(frame, []) if frame is not None else []
        ops, inner = Counter({op: 1}), [own]
        if op in ("fusion", "custom-call", "call"):
            for c in calls:
                o, ch = contents(c)
                ops.update(o)
                inner += ch
        out[name] = _categorize(op, ops, inner, name)
        out.setdefault(normalize(name), out[name])
    return out


def _categorize(op: str, ops: Counter, chains: list[list[str]], name: str) -> str:
    is_gemm = bool(_DOT & set(ops)) or (op == "custom-call" and re.search(r"gemm|cublas|dot", name))
    if is_gemm:
        if any("token_losses" in fn for chain in chains for fn, _ in chain):
            return "matmuls (output layer)"
        return "matmuls (blocks)"
    votes = Counter(c for c in (_by_function(ch) for ch in chains) if c is not None)
    if votes:
        return votes.most_common(1)[0][0]
    if ops["dynamic-update-slice"] or ops["dynamic-slice"]:
        return "carries and stacks"
    if ops["convert"] and not (set(ops) - {"convert", "parameter", "bitcast", "fusion", "tuple",
                                          "get-tuple-element", "constant"}):
        return "casts"
    if ops["copy"] or ops["transpose"]:
        return "copies and transposes"
    return "other"
