"""Count what a traced program asks for: attention kernel calls by kind, dense matmul FLOPs
(and how many of them have an operand wider than 16 bits) and float32 <-> bfloat16 casts.

`count(closed_jaxpr)` walks a jaxpr and every sub-jaxpr it holds (pjit, custom_jvp /
custom_vjp calls, checkpoint/remat, scan, while and cond), multiplying loop bodies by
their trip counts. Trip counts of `while` loops (a `fori_loop` whose bounds are traced)
are found by evaluating the program's integer and boolean scalars: a loop whose
condition depends only on such scalars is stepped through iteration by iteration, so a
segment length computed from an outer loop's counter is counted exactly. A `cond` whose
branch cannot be decided counts its most expensive branch.

Attention kernels are recognized by the names their backends give them: the Pallas
kernels' `pallas_call` names (`mgd_attention_forward`, `..._backward_dq`,
`..._double_backward_rows`; these run interpreted on a CPU, so the count works there),
the Triton kernels' names and the CUDA extension's FFI target. Matmuls inside a kernel
are the kernel's, not dense work: they are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from jax.extend import core as jcore

__all__ = ["Counts", "count", "KIND_OF_KERNEL"]

KINDS = ("forward", "backward", "double_backward")

# One entry per kernel launch that marks one call of the kind: the backward's dq
# kernel (its dk/dv and delta kernels belong to the same call), the double backward's
# row-statistics kernel.
KIND_OF_KERNEL = {
    "mgd_attention_forward": "forward",
    "mgd_attention_backward_dq": "backward",
    "mgd_attention_double_backward_rows": "double_backward",
}

# Scalars at most this large are evaluated to find trip counts; nothing bigger is.
_MAX_EVAL_SIZE = 1


@dataclass
class Counts:
    """Attention kernel calls by kind and dense matmul FLOPs (outside the kernels)."""
    attention: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    dense_flops: float = 0.0
    # of dense_flops, the products with an operand wider than 16 bits (float32 against a bf16
    # operand runs as a float32 product, at a fraction of the bf16 tensor rate)
    wide_flops: float = 0.0
    # convert_element_type between float32 and bfloat16: how many, and the bytes they write
    casts: int = 0
    cast_bytes: float = 0.0
    unknown_loops: int = 0       # while loops whose trip count could not be found (counted once)

    def add(self, other: Counts, times: int = 1) -> None:
        for kind in KINDS:
            self.attention[kind] += times * other.attention[kind]
        self.dense_flops += times * other.dense_flops
        self.wide_flops += times * other.wide_flops
        self.casts += times * other.casts
        self.cast_bytes += times * other.cast_bytes
        self.unknown_loops += other.unknown_loops

    def scaled(self, times: int) -> Counts:
        out = Counts()
        out.add(self, times)
        return out

    @classmethod
    def max_of(cls, options) -> Counts:
        out = Counts()
        for kind in KINDS:
            out.attention[kind] = max(o.attention[kind] for o in options)
        out.dense_flops = max(o.dense_flops for o in options)
        out.wide_flops = max(o.wide_flops for o in options)
        out.casts = max(o.casts for o in options)
        out.cast_bytes = max(o.cast_bytes for o in options)
        out.unknown_loops = max(o.unknown_loops for o in options)
        return out


def _kernel_name(eqn) -> str | None:
    """The attention kernel an eqn launches, or None."""
    p = eqn.params
    for key in ("name", "kernel_name", "target_name", "call_target_name"):
        value = p.get(key)
        if isinstance(value, str):
            return value
    info = p.get("name_and_src_info")
    if info is not None:
        return getattr(info, "name", None)
    return None


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs.shape) if i not in rhs_contract and i not in rhs_batch]
    return 2.0 * float(np.prod(lhs.shape)) * float(np.prod(rhs_free))


def _sub_jaxprs(params):
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr, list(item.consts)
            elif isinstance(item, jcore.Jaxpr):
                yield item, []


class _Walker:
    def __init__(self):
        self._cache = {}

    def walk(self, jaxpr, known_in):
        """(Counts, known outputs) of one jaxpr, given the known scalar inputs (None: unknown)."""
        key = (id(jaxpr), _key(known_in))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        env = {}
        for var, value in zip(jaxpr.invars, known_in):
            if value is not None:
                env[var] = value

        def read(v):
            if isinstance(v, jcore.Literal):
                return _small(np.asarray(v.val))
            return env.get(v)

        total = Counts()
        for eqn in jaxpr.eqns:
            counts, outs = self._eqn(eqn, [read(v) for v in eqn.invars])
            total.add(counts)
            for var, value in zip(eqn.outvars, outs):
                if value is not None and not isinstance(var, jcore.DropVar):
                    env[var] = value
        result = (total, [read(v) for v in jaxpr.outvars])
        self._cache[key] = result
        return result

    def _eqn(self, eqn, known):
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        kernel = _kernel_name(eqn) if name in ("pallas_call", "triton_kernel_call", "ffi_call",
                                               "custom_call") else None
        if kernel is not None:
            c = Counts()
            kind = KIND_OF_KERNEL.get(kernel)
            if kind is not None:
                c.attention[kind] += 1
            return c, [None] * n_out
        if name == "dot_general":
            c = Counts()
            c.dense_flops = _dot_flops(eqn)
            if any(np.dtype(v.aval.dtype).itemsize > 2 for v in eqn.invars[:2]):
                c.wide_flops = c.dense_flops
            return c, [None] * n_out
        if name == "convert_element_type":
            c = Counts()
            src, dst = eqn.invars[0].aval, eqn.outvars[0].aval
            if {np.dtype(src.dtype).name, np.dtype(dst.dtype).name} == {"float32", "bfloat16"}:
                c.casts = 1
                c.cast_bytes = float(np.prod(dst.shape)) * np.dtype(dst.dtype).itemsize
            return c, _evaluate(eqn, known)
        if name == "scan":
            return self._scan(eqn, known), [None] * n_out
        if name == "while":
            return self._while(eqn, known)
        if name == "cond":
            return self._cond(eqn, known)
        subs = list(_sub_jaxprs(eqn.params))
        if subs:
            total, outs = Counts(), [None] * n_out
            for i, (sub, consts) in enumerate(subs):
                inner_known = [None] * len(consts) + list(known)
                if len(sub.invars) != len(inner_known):
                    inner_known = [None] * len(sub.invars)
                counts, sub_outs = self.walk(sub, inner_known)
                total.add(counts)
                if i == 0 and len(sub_outs) == n_out:
                    outs = sub_outs
            return total, outs
        return Counts(), _evaluate(eqn, known)

    def _scan(self, eqn, known):
        p = eqn.params
        body = p["jaxpr"].jaxpr
        n_consts, n_carry = _scan_groups(p, len(known))
        length = p["length"]
        consts = list(known[:n_consts])
        carry = list(known[n_consts:n_consts + n_carry])
        xs = [None] * (len(known) - n_consts - n_carry)
        total = Counts()
        for i in range(length):
            counts, outs = self.walk(body, consts + carry + xs)
            if _key(outs[:n_carry]) == _key(carry):
                # Nothing known changes between iterations: the rest cost the same.
                total.add(counts, length - i)
                break
            total.add(counts)
            carry = list(outs[:n_carry])
        return total

    def _while(self, eqn, known):
        p = eqn.params
        cond, body = p["cond_jaxpr"], p["body_jaxpr"]
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts = known[:nc], known[nc:nc + nb]
        carry = list(known[nc + nb:])
        total = Counts()
        for _ in range(100_000):
            _, (go,) = self.walk(cond.jaxpr, list(cond_consts) + carry)
            if go is None:
                counts, _ = self.walk(body.jaxpr, list(body_consts) + [None] * len(carry))
                counts = counts.scaled(1)
                counts.unknown_loops += 1
                total.add(counts)
                return total, [None] * len(carry)
            if not bool(go):
                return total, carry
            counts, carry = self.walk(body.jaxpr, list(body_consts) + carry)
            total.add(counts)
        raise RuntimeError("while loop ran past 100000 iterations while counting")

    def _cond(self, eqn, known):
        branches = eqn.params["branches"]
        index, ops = known[0], list(known[1:])
        if index is not None:
            return self.walk(branches[int(index)].jaxpr, ops)
        results = [self.walk(b.jaxpr, ops) for b in branches]
        return Counts.max_of([r[0] for r in results]), [None] * len(eqn.outvars)


def _scan_groups(params, n_in):
    """(consts, carry) operand counts of a scan: positional counts before JAX 0.11, a
    FlatTree of the (consts, carry, xs) groups (`ft_in`) from 0.11 on."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    groups = params["ft_in"].update(list(range(n_in))).unpack()
    sizes = [len(list(g.vals)) for g in groups]
    return sizes[0], sizes[1]


def _key(values):
    return tuple(None if v is None else (v.dtype.str, v.item()) for v in values)


def _small(value):
    value = np.asarray(value)
    if value.size > _MAX_EVAL_SIZE or not (np.issubdtype(value.dtype, np.integer)
                                          or value.dtype == np.bool_):
        return None
    return value


def _evaluate(eqn, known):
    """Known outputs of a primitive on known integer/boolean scalars, else unknowns."""
    n_out = len(eqn.outvars)
    if any(v is None for v in known) or not known:
        return [None] * n_out
    if any(not _is_small_int(v.aval) for v in eqn.outvars if hasattr(v, "aval")):
        return [None] * n_out
    try:
        out = eqn.primitive.bind(*known, **eqn.params)
    except Exception:  # noqa: BLE001 - a primitive that will not run eagerly stays unknown
        return [None] * n_out
    outs = out if eqn.primitive.multiple_results else [out]
    return [_small(np.asarray(o)) for o in outs]


def _is_small_int(aval):
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    if shape is None or dtype is None or int(np.prod(shape)) > _MAX_EVAL_SIZE:
        return False
    return np.issubdtype(dtype, np.integer) or dtype == np.bool_


def count(closed_jaxpr) -> Counts:
    """Attention kernel calls by kind and dense matmul FLOPs of one traced program."""
    counts, _ = _Walker().walk(closed_jaxpr.jaxpr, [None] * len(closed_jaxpr.jaxpr.invars))
    return counts
