"""The memory planner: the fastest round program that fits, its fallback on out of memory,
and labels that do not depend on the program."""
from __future__ import annotations

import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from mgd.errors import UsageError
from mgd.pipeline import model, oracle, planner

CFG = model.GPTConfig(vocab_size=37, seq_len=8, n_layer=1, n_head=2, d_model=16,
                      attention_impl="xla", compute_dtype="float32")
# Labels compared across programs in float64: they then agree to 1e-9, not float32's 1e-4.
CFG64 = model.GPTConfig(vocab_size=37, seq_len=8, n_layer=1, n_head=2, d_model=16,
                        attention_impl="xla", compute_dtype="float64", param_dtype="float64")


@pytest.mark.parametrize("text,want", [("16GB", 16 * 10**9), ("16 GiB", 16 * 2**30),
                                       ("1.5e9", 1_500_000_000), ("800MB", 8 * 10**8),
                                       (2e9, 2_000_000_000), ("0.5gb", 5 * 10**8)])
def test_parse_bytes(text, want):
    assert planner.parse_bytes(text) == want


@pytest.mark.parametrize("bad", ["16 GX", "lots", "-1GB", "0", ""])
def test_parse_bytes_refuses(bad):
    with pytest.raises(ValueError):
        planner.parse_bytes(bad)
    with pytest.raises(ValueError, match="memory_budget"):
        oracle.OracleConfig(memory_budget=bad)


def test_parse_bytes_lives_below_the_configs():
    """OracleConfig checks its memory budget without importing the planner (no cycle)."""
    import subprocess
    import sys
    code = ("import sys\nfrom mgd.pipeline import oracle\noracle.OracleConfig(memory_budget='16GB')\n"
            "print('mgd.pipeline.planner' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    from mgd.pipeline import units
    assert planner.parse_bytes is units.parse_bytes


def _brute_force(ranked, estimates, limit):
    """The cheapest candidate whose estimate is within `limit`, by looking at all."""
    fitting = [c for c in ranked if estimates[c.name] <= limit]
    return min(fitting, key=lambda c: c.cost) if fitting else None


@pytest.mark.slow
def test_planner_picks_the_cheapest_program_that_fits_with_xla_estimates():
    """Every candidate compiled on this CPU (XLA's real estimates); for budgets between
    them, the planner (which compiles only some, in cost order, and skips those it knows
    need more) picks what a look at all of them picks."""
    oc = oracle.OracleConfig(k=2, inner_steps=4, rounds=3, target_batch=2,
                             max_rounds_per_device=1, warm_start=False)
    ranked = planner.candidates(CFG, oc, target_rows=2, rounds_to_label=3)
    assert [c.cost for c in ranked] == sorted(c.cost for c in ranked)
    assert {c.family for c in ranked} == set(planner.FAMILIES)
    estimates = {c.name: planner.estimate_bytes(CFG, c.apply(oc, 2), 2)["bytes"] for c in ranked}
    # The plans differ in memory, and the cheapest plan needs the most of the ones compared.
    assert len(set(estimates.values())) >= 3
    assert estimates[ranked[0].name] > min(estimates.values())
    by_program = {c.apply(oc, 2): estimates[c.name] for c in ranked}
    levels = sorted(set(estimates.values()))
    for budget in [levels[-1] / (1 - planner.MARGIN)] + [
            (a + b) / 2 / (1 - planner.MARGIN) for a, b in zip(levels, levels[1:])]:
        p = planner.Planner(CFG, oc, 2, 3, budget=int(budget), budget_source="test",
                            estimate=lambda o: by_program[o])
        chosen_oc = p.plan()
        want = _brute_force(ranked, estimates, int(budget) * (1 - planner.MARGIN))
        assert p.chosen.name == want.name, (budget, p.tried)
        assert chosen_oc == want.apply(oc, 2)
        assert p.metadata()["chosen"]["name"] == want.name
    # Below the smallest estimate nothing fits: one clear error.
    p = planner.Planner(CFG, oc, 2, 3, budget=int(levels[0] * 0.9), budget_source="test",
                        estimate=lambda o: by_program[o])
    with pytest.raises(planner.PlanError, match="no round program fits") as err:
        p.plan()
    # A budget too small for the settings is the user's to fix: the CLI's one-line error.
    assert isinstance(err.value, UsageError) and "\n" not in str(err.value)


def _fake_estimate(oc):
    """Bytes that shrink down the families and micro-batches and grow with rounds."""
    family = [name for name, plan in planner.FAMILIES.items() if plan == oc.remat][0]
    base = {"keep_all": 100, "lean": 80, "lean+segments": 70, "lean+micro": 60, "frugal": 50}
    return (base[family] + (oc.micro_batch or oc.k)) * oc.rounds_per_device


def _corpus(seed=0):
    rng = np.random.default_rng(seed)
    return types.SimpleNamespace(tokens=rng.integers(0, 37, (16, 9)).astype(np.int32),
                                 target_tokens=rng.integers(0, 37, (6, 9)).astype(np.int32))


def test_planned_labels_equal_unplanned_and_out_of_memory_falls_back(tmp_path, monkeypatch):
    """The planner's program (2 rounds per device at once) runs out of memory (simulated);
    labeling moves to the cheapest program estimated below it and finishes; the labels
    equal the unplanned rounds'."""
    corpus = _corpus()
    params = model.init_params(CFG64, jax.random.key(1))
    oc = oracle.OracleConfig(k=4, inner_steps=2, inner_lr=1e-2, rounds=4, target_batch=4,
                             warm_start=False, auto_plan=True, memory_budget="240B",
                             max_rounds_per_device=2)
    monkeypatch.setattr(oracle, "_planner_for", lambda m, o, t, n, d: planner.Planner(
        m, o, t, n, d, budget=240, budget_source="test", estimate=_fake_estimate))
    real = oracle._sharded_round_fn
    failed = []

    def sharded(model_cfg, run_oc, devices):
        if run_oc.remat == oracle.PLANS["keep_all"] and run_oc.rounds_per_device == 2:
            def oom(*args):
                failed.append(run_oc)
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
            return oom
        return real(model_cfg, run_oc, devices)

    monkeypatch.setattr(oracle, "_sharded_round_fn", sharded)
    labels = oracle.label(params, corpus, CFG64, oc, tmp_path, progress=False)
    assert len(failed) == 1
    summary = json.loads((tmp_path / "oracle" / "summary.json").read_text())
    plan = summary["plan"]
    ranked = planner.candidates(CFG64, oc, target_rows=4, rounds_to_label=4)
    estimates = {c.name: _fake_estimate(c.apply(oc, 4)) for c in ranked}
    first = _brute_force(ranked, estimates, 240 * (1 - planner.MARGIN))
    assert (first.family, first.rounds_per_device) == ("keep_all", 2)
    # The fallback: the cheapest other program estimated below the failed one, less the margin.
    rest = [c for c in ranked if c.name != first.name]
    want = _brute_force(rest, estimates, estimates[first.name] * (1 - planner.MARGIN))
    assert plan["chosen"]["name"] == want.name and want.family != "keep_all"
    assert summary["round_program"]["rounds_per_device"] == want.rounds_per_device
    assert summary["round_program"]["remat"] == dataclasses.asdict(want.remat)
    assert summary["round_program"]["micro_batch"] == want.micro_batch
    fn = oracle.make_round_fn(CFG64, oracle.OracleConfig(k=4, inner_steps=2, inner_lr=1e-2,
                                                       rounds=4, target_batch=4, warm_start=False))
    for r in range(4):
        tau, phi = fn(params, corpus.tokens[labels.round_indices[r]],
                      corpus.target_tokens[labels.round_targets[r]])
        np.testing.assert_allclose(labels.round_tau[r], tau, rtol=1e-9, atol=1e-12)
        assert labels.round_phi[r] == pytest.approx(float(phi), rel=1e-12)


def test_batched_rounds_equal_single_rounds():
    """Several rounds per device at once (vmapped) give each round's own tau."""
    corpus = _corpus(2)
    params = model.init_params(CFG64, jax.random.key(2))
    oc = oracle.OracleConfig(k=4, inner_steps=2, inner_lr=1e-2, target_batch=3, warm_start=False,
                             rounds_per_device=3, remat="frugal", micro_batch=2)
    rng = np.random.default_rng(0)
    train = np.stack([corpus.tokens[rng.choice(16, 4, replace=False)] for _ in range(3)])
    target = np.stack([corpus.target_tokens[rng.choice(6, 3, replace=False)] for _ in range(3)])
    tau, phi = oracle.make_rounds_fn(CFG64, oc)(params, train, target)
    single = oracle.make_round_fn(CFG64, oracle.OracleConfig(k=4, inner_steps=2, inner_lr=1e-2,
                                                           target_batch=3, warm_start=False))
    for b in range(3):
        t, p = single(params, train[b], target[b])
        np.testing.assert_allclose(tau[b], t, rtol=1e-9, atol=1e-12)
        assert float(phi[b]) == pytest.approx(float(p), rel=1e-12)


def test_no_budget_keeps_the_configured_program():
    oc = oracle.OracleConfig(k=4, auto_plan=True, remat="frugal", micro_batch=2)
    p = planner.Planner(CFG64, oc, 4, 8, budget=None)
    assert p.plan() is oc and p.metadata()["chosen"] is None


def test_batches_predicted_too_large_are_not_compiled():
    """With each program's shared argument bytes known, a batch of rounds whose
    extrapolation from one round is over the limit is skipped uncompiled; the plan is
    still what a look at every candidate gives."""
    oc = oracle.OracleConfig(k=4, inner_steps=2, rounds=16, target_batch=2,
                             max_rounds_per_device=8, warm_start=False)
    compiled = []

    def estimate(o):
        compiled.append((o.remat, o.rounds_per_device))
        one = _fake_estimate(dataclasses.replace(o, rounds_per_device=1))
        return {"bytes": 40 + o.rounds_per_device * one, "argument_bytes": 40}

    ranked = planner.candidates(CFG, oc, target_rows=2, rounds_to_label=16)
    assert ranked[0].family == "keep_all" and ranked[0].rounds_per_device == 8
    estimates = {c.name: estimate(c.apply(oc, 2))["bytes"] for c in ranked}
    compiled.clear()
    budget = 400
    p = planner.Planner(CFG, oc, 2, 16, budget=budget, budget_source="test", estimate=estimate)
    p.plan()
    want = _brute_force(ranked, estimates, budget * (1 - planner.MARGIN))
    assert p.chosen.name == want.name
    # keep_all needs 144 bytes for one round (within 360); four (456) and eight rounds at
    # once, the cheapest candidates, are predicted over the limit and never compiled.
    keep_all = planner.FAMILIES["keep_all"]
    assert (keep_all, 1) in compiled
    assert (keep_all, 4) not in compiled and (keep_all, 8) not in compiled
    skipped = [t for t in p.tried if "predicted_bytes" in t]
    assert skipped and not any(t["fits"] for t in skipped)


def test_a_family_too_large_at_its_least_memory_is_checked_once():
    """lean+micro does not fit even at micro-batch 1: one compile rules the family out,
    and the plan is still what a look at every candidate gives."""
    oc = oracle.OracleConfig(k=8, inner_steps=2, rounds=1, target_batch=2,
                             max_rounds_per_device=1, warm_start=False)
    compiled = []

    def estimate(o):
        compiled.append((o.remat, o.micro_batch))
        return _fake_estimate(o)

    ranked = planner.candidates(CFG, oc, target_rows=2, rounds_to_label=1)
    estimates = {c.name: _fake_estimate(c.apply(oc, 2)) for c in ranked}
    budget = 55.8 / (1 - planner.MARGIN)   # frugal fits from micro-batch 4 down, lean+micro never
    p = planner.Planner(CFG, oc, 2, 1, budget=budget, budget_source="test", estimate=estimate)
    p.plan()
    want = _brute_force(ranked, estimates, budget * (1 - planner.MARGIN))
    assert p.chosen.name == want.name and p.chosen.family == "frugal"
    lean_micro = planner.FAMILIES["lean+micro"]
    assert [m for plan, m in compiled if plan == lean_micro] == [1]


@pytest.mark.parametrize("rounds", [1, 16])
def test_micro_batches_between_two_checked_sizes_are_read_off_the_line(rounds):
    """Within a family, a micro-batch whose memory interpolated between two checked sizes is
    over the limit is skipped uncompiled, also where a batch of rounds at that micro-batch
    comes first in cost order; the plan is still what a look at every candidate gives."""
    oc = oracle.OracleConfig(k=64, inner_steps=2, rounds=rounds, target_batch=2,
                             max_rounds_per_device=8, warm_start=False)
    compiled = []

    def estimate(o):
        compiled.append((o.remat, o.micro_batch))
        return _fake_estimate(o)

    ranked = planner.candidates(CFG, oc, target_rows=2, rounds_to_label=rounds)
    estimates = {c.name: _fake_estimate(c.apply(oc, 2)) for c in ranked}
    budget = 70 / (1 - planner.MARGIN)   # frugal fits up to micro-batch 16 (66), not 32 (82)
    p = planner.Planner(CFG, oc, 2, rounds, budget=budget, budget_source="test", estimate=estimate)
    p.plan()
    want = _brute_force(ranked, estimates, budget * (1 - planner.MARGIN))
    assert p.chosen.name == want.name and (p.chosen.family, p.chosen.micro_batch) == ("frugal", 16)
    frugal = [m for plan, m in compiled if plan == planner.FAMILIES["frugal"]]
    # Its least memory (1) and all 64 rows are compiled; 32 is read off the line between them.
    assert 1 in frugal and None in frugal and 32 not in frugal and 16 in frugal
    assert any(t["candidate"] == "frugal, micro-batch 32" and "predicted_bytes" in t
               for t in p.tried)
