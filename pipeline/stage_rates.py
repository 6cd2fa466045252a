"""The run on paper: per stage, the expected time and memory from measured rates.

`RATES` is the one table of measured rates. A rate holds for a run whose settings that
decide it (`Rate.fields`) equal those of the measured preset; for any other run the
stage prints "unmeasured", never a guess. `plan_lines(cfg, devices)` is what
`mgd run --dry-run [--devices N]` prints: the oracle's rounds split across devices (and
processes); every other stage runs on one device, so N does not shorten it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["Rate", "RATES", "plan_lines", "rate_for"]

_DEMO = "the demo run in docs/results.md (its log; 2026-11-29, commit 1352ab4, one H200)"
_ORACLE = "the GPT-2-small rounds in docs/results.md (2026-11-29, one H200)"
_MODEL = ("model", "corpus.seq_len", "corpus.vocab_size")
_LABELS = ("oracle.k", "oracle.inner_steps", "oracle.target_batch")


@dataclass(frozen=True)
class Rate:
    stage: str
    seconds: float           # per unit
    unit: str                # "round", "step", "stage", "population", "run"
    preset: str              # the preset whose settings it was measured with
    fields: tuple[str, ...]  # the settings that decide it
    source: str
    peak_bytes: float | None = None


# Each stage's wall time in the demo log (start of the next stage minus its start;
# compilation included), divided by its units.
RATES = (
    Rate("corpus", 5.0, "stage", "demo", ("corpus",), _DEMO),
    Rate("base", 34.9 / 1500, "step", "demo", _MODEL + ("base_train.batch_size",), _DEMO),
    Rate("oracle", 157.6 / 256, "round", "demo", _MODEL + _LABELS, _DEMO),
    Rate("features", 17.6, "stage", "demo", _MODEL + ("corpus", "scorer"), _DEMO),
    Rate("scorer", 16.6, "stage", "demo", ("corpus", "scorer"), _DEMO),
    Rate("ppl_correlations", 94.8 / 3, "population", "demo",
         _MODEL + ("corpus", "baselines.population", "baselines.population_train"), _DEMO),
    Rate("dsir", 36.9, "stage", "demo", ("corpus", "baselines.dsir"), _DEMO),
    Rate("continued", 63.4 / 21, "run", "demo", _MODEL + ("corpus", "continued"), _DEMO),
)

# Rounds measured outside a preset (bench_oracle, cuda attention): shown as the nearest
# measurement beside an unmeasured oracle, never used as its rate.
ROUNDS_MEASURED = (
    ("GPT-2-small shape, k=64, L=128, 16 inner steps, frugal micro-batch 2", 14.1, 13.97e9,
     _ORACLE + ", commit e97d203"),
    ("GPT-2-small shape, k=64, L=2048, 16 inner steps, frugal micro-batch 1", 102.8, 15.84e9,
     _ORACLE + ", commit dda0c64"),
)


# Where the corpus's documents come from does not change what a stage costs.
_SOURCES = ("ontarget", "offtarget")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj):
        return obj
    value = dataclasses.asdict(obj)
    return {k: v for k, v in value.items() if k not in _SOURCES} if path == "corpus" else value


def rate_for(stage: str, cfg) -> Rate | None:
    """The measured rate of `stage` that holds for `cfg`, or None."""
    from mgd.pipeline import presets
    for r in RATES:
        if r.stage != stage:
            continue
        ref = presets.get(r.preset)
        if all(_get(cfg, f) == _get(ref, f) for f in r.fields):
            return r
    return None


def _time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _params_bytes(cfg) -> int:
    """Float32 parameters of the run's model (from the config, nothing measured)."""
    import jax

    from mgd.pipeline.model import init_params, param_count
    m = cfg.model_config()
    return 4 * param_count(jax.eval_shape(lambda: init_params(m, jax.random.key(0))))


def plan_lines(cfg, devices: int = 1) -> list[str]:
    """Per stage: its work, the rate, the expected time on `devices` devices, memory."""
    methods = cfg.selection.methods
    runs = len(methods) * cfg.seeds
    populations = cfg.seeds if "ppl_correlations" in methods else 0
    rounds_per_device = math.ceil(cfg.oracle.rounds / devices)
    work = {
        "corpus": (1, "stage", "one process"),
        "base": (cfg.base_train.steps, "step", "one device"),
        "oracle": (rounds_per_device, "round",
                   f"{cfg.oracle.rounds} rounds split over {devices} device"
                   f"{'s' if devices > 1 else ''}: {rounds_per_device} per device"),
        "features": (1, "stage", "one device"),
        "scorer": (1, "stage", "one process"),
        "ppl_correlations": (populations, "population", "one device"),
        "dsir": (1 if "dsir" in methods else 0, "stage", "one process"),
        "continued": (runs, "run", f"{len(methods)} methods x {cfg.seeds} seeds, one device"),
    }
    lines, total, unknown = [], 0.0, []
    for stage, (units, unit, where) in work.items():
        if units == 0:
            continue
        r = rate_for(stage, cfg)
        if r is None:
            lines.append(f"{stage:17s} {units} {unit}{'s' if units != 1 else ''} ({where}): "
                         "unmeasured")
            unknown.append(stage)
            continue
        seconds = units * r.seconds
        total += seconds
        lines.append(f"{stage:17s} {units} {unit}{'s' if units != 1 else ''} x {r.seconds:.3g} s "
                     f"= {_time(seconds)} ({where}; measured: {r.source})")
    if rate_for("oracle", cfg) is None:
        for what, seconds, peak, source in ROUNDS_MEASURED:
            lines.append(f"{'':17s} nearest measured round: {what}: {seconds} s, peak "
                         f"{peak / 1e9:.2f} GB ({source})")
    p = _params_bytes(cfg)
    lines.append(f"{'memory':17s} parameters {p / 1e9:.2f} GB; one optimizer state (parameters "
                 f"+ Adam moments) {3 * p / 1e9:.2f} GB (from the config); the oracle round's "
                 "peak: " + ("planned at run time for the device's memory (oracle.auto_plan)"
                             if cfg.oracle.auto_plan else "unmeasured for these settings"))
    lines.append(f"{'total':17s} " + (f"{_time(total)} on {devices} device"
                                      f"{'s' if devices > 1 else ''}" if not unknown else
                                      f"{_time(total)} measured + unmeasured stages "
                                      f"({', '.join(unknown)})"))
    return lines
