"""The round's recomputation budget: the counter against hand-counted programs, and the
lean plan's counts pinned at the e2e shape."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mgd
from mgd.pipeline import jaxpr_count, oracle, round_budget
from mgd.pipeline.round_shapes import SHAPES, parse_shape


def _q(t=32, d=16, seed=0):
    return jax.random.normal(jax.random.key(seed), (1, t, 2, d), jnp.float32)


def test_counter_counts_kernels_by_kind_through_grad_of_grad():
    """Attention differentiated twice: 1 forward, 2 backwards, 1 double backward, as the
    op's nesting (mgd/op.py) says; and a loop body counted once per trip."""
    def f(q):
        return jnp.sum(mgd.attention(q, q, q, impl="pallas"))

    second = jax.make_jaxpr(jax.grad(lambda q: jnp.sum(jax.grad(f)(q) ** 2)))(_q())
    assert jaxpr_count.count(second).attention == {"forward": 1, "backward": 2,
                                                   "double_backward": 1}

    def looped(q):
        # An inner loop (a while) whose bound is the outer counter + 1: 1 + 2 + 3 trips.
        def outer(i, c):
            return jax.lax.fori_loop(0, i + 1, lambda _, c: c + f(q), c)
        return jax.lax.fori_loop(0, 3, outer, 0.0)

    c = jaxpr_count.count(jax.make_jaxpr(looped)(_q()))
    assert c.attention == {"forward": 6, "backward": 0, "double_backward": 0}
    assert c.unknown_loops == 0
    # A bound that is an input cannot be counted, and says so.
    unknown = jax.make_jaxpr(lambda q, n: jax.lax.fori_loop(0, n, lambda _, c: c + f(q), 0.0))
    assert jaxpr_count.count(unknown(_q(), 4)).unknown_loops == 1


def test_counter_dense_flops_match_the_matmul_shapes():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 7, 3)), rng.standard_normal((5, 3, 11))

    def f(a, b):
        def body(c, _):
            return c + jnp.einsum("bij,bjk->bik", a, b).sum(), None
        return jax.lax.scan(body, 0.0, None, length=4)[0]

    c = jaxpr_count.count(jax.make_jaxpr(f)(a, b))
    assert c.dense_flops == 4 * 2 * 5 * 7 * 3 * 11
    assert c.wide_flops == c.dense_flops           # float64 operands
    bf = jaxpr_count.count(jax.make_jaxpr(f)(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)))
    assert bf.dense_flops == c.dense_flops and bf.wide_flops == 0


def test_lean_round_meets_the_budget_at_the_e2e_shape():
    """One inner step at the e2e shape: at most 3 attention forwards, 4 backwards and 1
    double backward per layer, at most 16 dense forward-equivalents per round, and every
    product in bf16 (none against a float32 cotangent), derivatives of derivatives included."""
    shape = SHAPES["e2e"]
    bar = round_budget.Budget(forward=3, backward=4, double_backward=1,
                              dense_forward_equivalents=16, wide_forward_equivalents=0)
    lean = round_budget.round_budget(shape, 16384, oracle.PLANS["lean"], "pallas", inner_steps=1)
    assert lean.within(bar), lean
    # The frugal plan is today's schedule: the counts the issue measured.
    frugal = round_budget.round_budget(shape, 16384, oracle.PLANS["frugal"], "pallas",
                                       inner_steps=1)
    assert (frugal.forward, frugal.backward, frugal.double_backward) == (7, 6, 1)
    assert frugal.dense_forward_equivalents == pytest.approx(19.75)


def test_floor_and_cli(capsys):
    f = round_budget.floor(1, 4, 4)
    assert (f.forward, f.backward, f.double_backward, f.dense_forward_equivalents) == (3, 4, 1, 15)
    assert round_budget.main(["--shape", "toy:16", "--plan", "lean", "--inner-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| lean |" in out and "| floor (docs/round.md) | 3 | 4 | 1 | 15.00 | 0.00 |" in out
    with pytest.raises(SystemExit) as exc:
        round_budget.main(["--shape", "nope:16"])
    assert exc.value.code != 0
    with pytest.raises(ValueError, match="--shape"):
        parse_shape("e2e")


def test_round_timing_cpu_path_writes_its_table(tmp_path):
    """The GPU timing script's own path at a toy shape: every (impl, plan) row measured,
    the stand-in's share computed, bad input refused with the argument's name."""
    from bench import round_timing

    out = tmp_path / "timing"
    assert round_timing.main(["--shape", "toy:16", "--impls", "xla,standin", "--plans",
                              "lean,frugal", "--repeats", "1", "--in-process",
                              "--out", str(out)]) == 0
    import csv
    rows = list(csv.DictReader(open(out / "round_timing.csv")))
    assert [(r["impl"], r["plan"], r["status"]) for r in rows] == [
        ("xla", "lean", "ok"), ("xla", "frugal", "ok"),
        ("standin", "lean", "ok"), ("standin", "frugal", "ok")]
    assert all(float(r["median_s"]) > 0 for r in rows)
    assert rows[0]["attention_share"] != "" and rows[2]["attention_share"] == ""
    assert "| toy | 16 | xla | lean | ok |" in (out / "round_timing.md").read_text()
    for bad in (["--shape", "toy"], ["--shape", "toy:16", "--impls", "nope"],
                ["--shape", "toy:16", "--impls", "cuda+nope"]):
        with pytest.raises(SystemExit) as exc:
            round_timing.main(bad + ["--out", str(out)])
        assert exc.value.code != 0


def test_round_timing_variants_set_their_backend_switches(monkeypatch):
    from bench.round_timing import parse_impl, switches

    assert parse_impl("pallas") == ("pallas", {})
    assert parse_impl("cuda+split") == ("cuda", {"MGD_CUDA_SPLIT_CALLS": "1"})
    assert parse_impl("cuda+onecall+fused") == (
        "cuda", {"MGD_CUDA_SPLIT_CALLS": "0", "MGD_CUDA_DETERMINISTIC": "0"})
    # Measured in process, a variant's switches hold only while it runs.
    monkeypatch.delenv("MGD_CUDA_SPLIT_CALLS", raising=False)
    monkeypatch.setenv("MGD_CUDA_DETERMINISTIC", "1")
    import os
    with switches("cuda+onecall+fused"):
        assert os.environ["MGD_CUDA_SPLIT_CALLS"] == "0"
        assert os.environ["MGD_CUDA_DETERMINISTIC"] == "0"
    assert "MGD_CUDA_SPLIT_CALLS" not in os.environ
    assert os.environ["MGD_CUDA_DETERMINISTIC"] == "1"
