"""The memory planner of the labeling rounds: the fastest round program that fits the device.

From the model, k, L, the inner steps and the device's memory, `plan` chooses what one
round recomputes (`oracle.RematPlan`: keep_all, lean, lean with segments, micro-batch
remat keeping attention, frugal), the gradient micro-batch (divisors of k), the two-level
segments of the reverse pass, and how many rounds each device runs at once (vmapped).

Candidates are ranked by a cost model, cheapest first: the round's dense matmul FLOPs in
forward-equivalents (counted in its jaxpr by `round_budget.forward_equivalents`), times a
penalty for short matmuls, times the padding of the last group of rounds. Each candidate in that order
is compiled (nothing runs) and XLA's memory analysis (temp + argument + output bytes) is
checked against the budget less a safety margin; the first that fits is the plan. A
candidate that batches rounds is compiled only after the same candidate with one round
per device fit, and a larger micro-batch needs more memory than a smaller one of the same
plan, so many candidates are skipped unchecked.

At run time an out-of-memory error (XLA's RESOURCE_EXHAUSTED) moves the labeling to the
cheapest candidate whose estimate is below the failed one's (`Planner.fallback`).
docs/planner.md says how to read the plan.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import jax

from mgd.errors import UsageError
from mgd.pipeline import oracle, round_budget
from mgd.pipeline.oracle import OracleConfig, RematPlan
from mgd.pipeline.units import parse_bytes

__all__ = ["Candidate", "Planner", "PlanError", "parse_bytes", "device_budget", "candidates",
           "is_out_of_memory", "analysed_bytes", "MARGIN", "SHORT_MATMUL_TOKENS"]

log = logging.getLogger(__name__)

# Estimates must leave this share of the budget free for what the compile-time analysis
# does not see (the runtime's own buffers); on a GPU it is the peak, not a rough proxy.
MARGIN = 0.03
# Matmuls of fewer tokens than this run well below the device's peak: cost x (1 + this /
# tokens per matmul). Fit to two H100 rounds of the seed configuration (micro-batch 64:
# 4.26 s, 16: 5.94 s, same FLOPs), which give about 1200 tokens.
SHORT_MATMUL_TOKENS = 1024
# Compiles per planning at most; past it the least-memory candidate is taken unchecked.
MAX_COMPILES = 12
# A batch of b rounds shares its arguments (parameters, optimizer state) and needs about b
# times one round's other bytes; a batch predicted this much over the limit is not compiled.
BATCH_PREDICTION_SLACK = 0.10

# Plan families, from the most memory and least recomputation to the least memory.
FAMILIES = {
    "keep_all": oracle.PLANS["keep_all"],
    "lean": oracle.PLANS["lean"],
    "lean+segments": RematPlan(block="attention", segments=True),
    "lean+micro": RematPlan(block="attention", micro_batch=True, segments=True),
    "frugal": oracle.PLANS["frugal"],
}


class PlanError(UsageError, RuntimeError):
    """No candidate fits the memory budget: the settings (k, the sequence length, the
    budget) are the user's to change, so the CLI ends it in one line."""


def device_budget(device=None) -> int | None:
    """The device's allocatable bytes (`memory_stats()['bytes_limit']`), None where the
    backend does not say (a CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


def is_out_of_memory(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


@dataclass(frozen=True)
class Candidate:
    """One round program: what it recomputes, its micro-batch, rounds per device at once."""
    family: str
    remat: RematPlan
    micro_batch: int | None        # None: all k rows at once
    rounds_per_device: int
    forward_equivalents: float     # dense matmul FLOPs per round / one forward over k rows
    cost: float                    # relative time per labeled row (lower is faster)

    @property
    def name(self) -> str:
        mb = f", micro-batch {self.micro_batch}" if self.micro_batch else ""
        rounds = f", {self.rounds_per_device} rounds per device" if self.rounds_per_device > 1 else ""
        return f"{self.family}{mb}{rounds}"

    def apply(self, oc: OracleConfig, target_rows: int) -> OracleConfig:
        """`oc` running this candidate (the labels' settings unchanged)."""
        target_micro = None
        if self.micro_batch is not None and self.remat.micro_batch:
            target_micro = max(d for d in _divisors(target_rows) if d <= self.micro_batch)
        return dataclasses.replace(oc, remat=self.remat, micro_batch=self.micro_batch,
                                   target_micro_batch=target_micro, segments=None,
                                   rounds_per_device=self.rounds_per_device)

    def as_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "remat": dataclasses.asdict(self.remat),
                "micro_batch": self.micro_batch, "rounds_per_device": self.rounds_per_device,
                "forward_equivalents": round(self.forward_equivalents, 3),
                "relative_cost_per_row": round(self.cost, 4)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(model_cfg, oc: OracleConfig, target_rows: int, rounds_to_label: int,
               n_devices: int = 1) -> list[Candidate]:
    """Every candidate for these shapes, cheapest first."""
    k, seq_len = oc.k, model_cfg.seq_len
    batch_sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= oc.max_rounds_per_device
                   and (b == 1 or b <= -(-rounds_to_label // n_devices))]
    out = []
    for family, plan in FAMILIES.items():
        micros = [d for d in reversed(_divisors(k)) if d < k] if plan.micro_batch else []
        if family != "lean+micro":   # lean+micro on all k rows at once is lean+segments
            micros = [None] + micros
        fe = {}
        for micro in micros:
            # Micro-batch remat recomputes the same work whatever the micro-batch: count
            # once with micro-batches and once without.
            if (micro is None) not in fe:
                probe = dataclasses.replace(oc, remat=plan, micro_batch=micro,
                                            target_micro_batch=None, segments=None,
                                            rounds_per_device=1)
                fe[micro is None] = round_budget.forward_equivalents(model_cfg, probe, target_rows)
            rows = micro or k
            for b in batch_sizes:
                groups = -(-rounds_to_label // (n_devices * b))
                padding = groups * n_devices * b / rounds_to_label
                cost = fe[micro is None] * (1 + SHORT_MATMUL_TOKENS / (rows * seq_len * b)) * padding
                out.append(Candidate(family, plan, micro, b, fe[micro is None], cost))
    return sorted(out, key=lambda c: c.cost)


def estimate_bytes(model_cfg, oc: OracleConfig, target_rows: int) -> dict:
    """XLA's compile-time memory analysis of one device's program under `oc` (its
    `rounds_per_device` rounds at once): compiled for the default backend, never run."""
    params, train, target, adam = round_budget.abstract_inputs(model_cfg, oc, target_rows,
                                                               oc.rounds_per_device)
    compiled = oracle.make_rounds_fn(model_cfg, oc).lower(params, train, target, adam).compile()
    est = analysed_bytes(compiled)
    if est is None:
        raise RuntimeError("this backend gives no compile-time memory analysis")
    return est


def analysed_bytes(compiled) -> dict | None:
    """XLA's memory analysis of a compiled program: total (temp + arguments + outputs, less
    what outputs alias), temp and argument bytes; None where the backend gives none."""
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    total = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
             - ma.alias_size_in_bytes)
    return {"bytes": int(total), "temp_bytes": int(ma.temp_size_in_bytes),
            "argument_bytes": int(ma.argument_size_in_bytes)}


@dataclass
class Planner:
    """Plans `oc`'s rounds for a budget; remembers what it compiled, for the fallback.

    `estimate(oc)` is XLA's analysis by default (tests pass their own): bytes, or a dict
    with "bytes" and "argument_bytes" (what rounds batched together share)."""
    model_cfg: object
    oc: OracleConfig
    target_rows: int
    rounds_to_label: int
    n_devices: int = 1
    budget: int | None = None
    budget_source: str = "none"
    estimate: Callable[[OracleConfig], int] | None = None
    max_compiles: int = MAX_COMPILES
    tried: list = field(default_factory=list)
    chosen: Candidate | None = None
    _estimates: dict = field(default_factory=dict)
    _argument_bytes: dict = field(default_factory=dict)
    _ranked: list | None = None

    @classmethod
    def for_device(cls, model_cfg, oc: OracleConfig, target_rows: int, rounds_to_label: int,
                   n_devices: int = 1, **kw) -> Planner:
        """The budget from `oc.memory_budget`, else the device's `bytes_limit`."""
        if oc.memory_budget is not None:
            budget, source = parse_bytes(oc.memory_budget), f"oracle.memory_budget={oc.memory_budget}"
        else:
            budget = device_budget()
            source = "the device's bytes_limit" if budget else "none"
        return cls(model_cfg, oc, target_rows, rounds_to_label, n_devices, budget, source, **kw)

    @property
    def ranked(self) -> list[Candidate]:
        if self._ranked is None:
            self._ranked = candidates(self.model_cfg, self.oc, self.target_rows,
                                      self.rounds_to_label, self.n_devices)
        return self._ranked

    def _bytes(self, c: Candidate) -> int:
        key = (c.family, c.micro_batch, c.rounds_per_device)
        if key not in self._estimates:
            oc = c.apply(self.oc, self.target_rows)
            log.info(f"planner: compiling {c.name} for its memory estimate")
            self._estimates[key], args = self._estimate(oc)
            if args is not None:
                self._argument_bytes[key] = args
        return self._estimates[key]

    def _estimate(self, oc: OracleConfig) -> tuple[int, int | None]:
        """(bytes, argument bytes or None) of `oc`'s program."""
        est = (self.estimate(oc) if self.estimate is not None
               else estimate_bytes(self.model_cfg, oc, self.target_rows))
        if isinstance(est, dict):
            return int(est["bytes"]), int(est["argument_bytes"])
        return int(est), None

    def _least_memory(self, family: str) -> Candidate | None:
        """The family's smallest micro-batch, one round at once; None for a family
        without micro-batches."""
        if not FAMILIES[family].micro_batch:
            return None
        return min((c for c in self.ranked if c.family == family and c.rounds_per_device == 1),
                   key=lambda c: c.micro_batch or self.oc.k)

    def _predicted_batch_bytes(self, c: Candidate) -> int | None:
        """Bytes of `c` (several rounds at once) extrapolated from its one-round program:
        shared arguments plus `rounds` times the rest; None without the split."""
        key = (c.family, c.micro_batch, 1)
        if key not in self._argument_bytes:
            return None
        args = self._argument_bytes[key]
        return args + c.rounds_per_device * (self._estimates[key] - args)

    def _interpolated_bytes(self, c: Candidate) -> int | None:
        """Bytes of `c` (one round) read off the line between the estimates of its family's
        nearest checked micro-batches below and above it; None unless both are known.
        Memory grows concavely with the micro-batch (measured: docs/planner.md), so the line
        is a lower bound."""
        rows = c.micro_batch or self.oc.k
        known = {(m or self.oc.k): b for (f, m, r), b in self._estimates.items()
                 if f == c.family and r == 1}
        below = max((m for m in known if m < rows), default=None)
        above = min((m for m in known if m > rows), default=None)
        if below is None or above is None:
            return None
        lo, hi = known[below], known[above]
        return int(lo + (hi - lo) * (rows - below) / (above - below))

    def _choose(self, limit: float, exclude=()) -> Candidate:
        failed = []   # (family, micro_batch, rounds): these and anything needing more are out
        compiles = 0

        def dominated(c):
            return any(c.family == f and (c.micro_batch or self.oc.k) >= (m or self.oc.k)
                       and c.rounds_per_device >= r for f, m, r in failed)

        def fits(c):
            nonlocal compiles
            key = (c.family, c.micro_batch, c.rounds_per_device)
            compiles += key not in self._estimates
            est = self._bytes(c)
            ok = est <= limit
            self.tried.append({"candidate": c.name, "estimate_bytes": est,
                               "limit_bytes": int(limit), "fits": ok})
            if not ok:
                failed.append(key)
            return ok

        def below_the_line(c):
            """`c` (one round) skipped uncompiled: its bytes read off the line between two
            checked micro-batches of its family are over the limit."""
            key = (c.family, c.micro_batch, 1)
            if key in self._estimates:
                return False
            between = self._interpolated_bytes(c)
            if between is None or between <= limit:
                return False
            self.tried.append({"candidate": c.name, "predicted_bytes": between,
                               "limit_bytes": int(limit), "fits": False})
            failed.append(key)
            return True

        probed = set()
        for c in self.ranked:
            if c.name in exclude or dominated(c):
                continue
            if compiles >= self.max_compiles:
                break
            # A family of micro-batches is checked at its least memory first: when that
            # does not fit, none of the family does (one compile instead of one per size).
            least = self._least_memory(c.family)
            if least is not None and c.family not in probed and least.name not in exclude:
                probed.add(c.family)
                if least.name != c.name and not fits(least):
                    continue
            if c.rounds_per_device == 1 and below_the_line(c):
                continue
            if c.rounds_per_device > 1:   # batching rounds only on top of one round that fits
                single = next(s for s in self.ranked if s.family == c.family
                              and s.micro_batch == c.micro_batch and s.rounds_per_device == 1)
                if (dominated(single) or below_the_line(single) or not fits(single)
                        or dominated(c)):
                    continue
                predicted = self._predicted_batch_bytes(c)
                if predicted is not None and predicted * (1 - BATCH_PREDICTION_SLACK) > limit:
                    self.tried.append({"candidate": c.name, "predicted_bytes": predicted,
                                       "limit_bytes": int(limit), "fits": False})
                    failed.append((c.family, c.micro_batch, c.rounds_per_device))
                    continue
            if fits(c):
                return c
        if compiles >= self.max_compiles:
            # The cheapest candidate already known to fit (a batch's single round, checked
            # before the batch was ruled out), else the least memory unchecked.
            known = [c for c in self.ranked if c.rounds_per_device == 1 and c.name not in exclude
                     and self._estimates.get((c.family, c.micro_batch, 1), limit + 1) <= limit]
            if known:
                log.warning(f"planner: {self.max_compiles} compiles; taking the cheapest "
                            f"candidate that fit ({known[0].name})")
                return known[0]
            frugal = [c for c in self.ranked if c.family == "frugal"
                      and c.rounds_per_device == 1 and c.name not in exclude]
            least = min(frugal, key=lambda c: c.micro_batch or self.oc.k, default=None)
            if least is not None and not dominated(least):
                log.warning(f"planner: {self.max_compiles} compiles without a fit; taking the "
                            f"least-memory candidate ({least.name}) unchecked")
                return least
        smallest = min((t["estimate_bytes"] for t in self.tried if "estimate_bytes" in t), default=0)
        raise PlanError(f"no round program fits {limit / 1e9:.2f} GB ({self.budget_source}, "
                        f"less a {MARGIN:.0%} margin): the smallest tried needs "
                        f"{smallest / 1e9:.2f} GB; "
                        "lower oracle.k or the sequence length, or raise oracle.memory_budget")

    def plan(self) -> OracleConfig:
        """`oc` under the cheapest candidate that fits; `oc` itself when no budget is known."""
        if self.budget is None:
            log.info("planner: no memory limit known (a CPU, and no oracle.memory_budget): "
                     "the configured round program")
            return self.oc
        self.chosen = self._choose(self.budget * (1 - MARGIN))
        log.info(f"planner: {self.chosen.name} (estimated "
                 f"{self._bytes(self.chosen) / 1e9:.2f} GB of {self.budget / 1e9:.2f} GB, "
                 f"{self.chosen.forward_equivalents:.2f} dense forward-equivalents per round)")
        return self.chosen.apply(self.oc, self.target_rows)

    def fallback(self, failed: OracleConfig) -> OracleConfig:
        """After an out-of-memory error under `failed`: the cheapest candidate estimated
        below it (less the margin). PlanError when none is."""
        failed_bytes = None
        for c in self.ranked:
            if c.apply(self.oc, self.target_rows) == failed:
                failed_bytes = self._bytes(c)
                break
        if failed_bytes is None:   # a configured program, not a candidate
            failed_bytes = self._estimate(failed)[0]
        limit = failed_bytes * (1 - MARGIN)
        if self.budget is not None:
            limit = min(limit, self.budget * (1 - MARGIN))
        exclude = {c.name for c in self.ranked if c.apply(self.oc, self.target_rows) == failed}
        self.chosen = self._choose(limit, exclude)
        log.warning(f"planner: out of memory; falling back to {self.chosen.name} (estimated "
                    f"{self._bytes(self.chosen) / 1e9:.2f} GB)")
        return self.chosen.apply(self.oc, self.target_rows)

    def metadata(self) -> dict:
        """What the oracle stage records: the budget, the plan, what was checked."""
        return {"budget_bytes": self.budget, "budget_source": self.budget_source,
                "margin": MARGIN, "chosen": self.chosen.as_dict() if self.chosen else None,
                "chosen_estimate_bytes": (self._bytes(self.chosen) if self.chosen else None),
                "checked": self.tried}

    def describe(self, top: int = 8) -> list[str]:
        """The candidates, cheapest first, one line each (for the dry-run)."""
        return [f"{c.name}: {c.forward_equivalents:.2f} forward-equivalents per round, "
                f"relative cost per row {c.cost:.3g}" for c in self.ranked[:top]]


def dry_run_lines(cfg, devices: int = 1, top: int = 6) -> list[str]:
    """What `mgd run --dry-run` says of the round program of `cfg` (a RunConfig): the
    configured one, the planner's choice where an accelerator is present, or, on a CPU,
    that it is planned at run time on the device, with the candidates cheapest first."""
    oc = cfg.oracle
    program = (f"remat {oc.remat.block} block / micro-batch remat {oc.remat.micro_batch} / "
               f"segments {oc.remat.segments}, micro_batch {oc.micro_batch}, "
               f"rounds per device {oc.rounds_per_device}")
    if not oc.auto_plan:
        return [f"configured (oracle.auto_plan = false): {program}"]
    model_cfg = cfg.model_config()
    target_rows = min(oc.target_batch, cfg.corpus.n_target)
    rounds = -(-oc.rounds // devices)
    p = Planner.for_device(model_cfg, oc, target_rows, rounds, 1)
    budget = (f"{p.budget / 1e9:.2f} GB ({p.budget_source})" if p.budget
              else "the device's bytes_limit")
    if jax.default_backend() != "cpu" and p.budget is not None:
        p.plan()
        est = p.metadata()["chosen_estimate_bytes"]
        return [f"planned for {budget}: {p.chosen.name}, estimated {est / 1e9:.2f} GB "
                f"({len(p.tried)} programs checked)"]
    return ([f"planned at run time on the device, for {budget} (no accelerator here to "
             f"compile for); if none fits or no limit is known: {program}",
             "candidates, cheapest first (the first whose XLA estimate fits is taken):"]
            + ["  " + line for line in p.describe(top)])
