"""The run's configuration: one typed `RunConfig`, and how it is overridden and printed.

A preset (`presets.py`) builds a `RunConfig`; a TOML file (`mgd run --config FILE`) and
`--set section.field=value` options override any field of it, each value parsed by the
field's type. TOML because the standard library reads it (`tomllib`), its scalars are
typed (integers, floats, booleans, strings, arrays) and it adds no dependency. TOML has
no null: the string "none" stands for None in an optional field, in a file as on the
command line. `to_toml` prints a config in the same form, so a printed config
(`mgd run --dry-run`) can be edited and given back with `--config`.

The sections reuse the library's own dataclasses where one exists (CorpusConfig,
TrainConfig, OracleConfig, PopulationConfig, ContinuedConfig), so a field means the same
thing in the config as in the code that uses it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mgd.errors import UsageError
from mgd.pipeline.baselines.ppl_correlations import PopulationConfig
from mgd.pipeline.continued import ContinuedConfig
from mgd.pipeline.corpus import CorpusConfig
from mgd.pipeline.oracle import OracleConfig
from mgd.pipeline.train import TrainConfig

__all__ = ["RunConfig", "ModelConfig", "ScorerConfig", "SelectionConfig", "DsirConfig",
           "BaselinesConfig", "METHODS", "DEFAULT_METHODS", "SIMILARITY_BASELINES", "ABLATIONS",
           "OURS", "REGRESSORS", "ATTENTION_IMPLS",
           "apply_overrides", "parse_assignment", "load_toml", "to_toml", "to_plan",
           "plan_differences", "validate"]

OURS = "metagrad_distilled"
# What a run compares unless told otherwise (the smoke preset runs exactly these).
DEFAULT_METHODS = (OURS, "oracle_labels", "random", "low_perplexity", "ppl_correlations", "dsir",
                   "oracle_ontarget")
# Selection by similarity to the target on the scorer's hidden-state features, no metagradient.
SIMILARITY_BASELINES = ("nearest_target", "knn_target", "target_classifier")
# The distilled rule with its score swapped out, and the distilled score without the rule.
ABLATIONS = ("rule_nearest", "rule_random", "distilled_topk")
METHODS = DEFAULT_METHODS + SIMILARITY_BASELINES + ABLATIONS
REGRESSORS = ("ridge", "mlp")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "triton", "cuda")
NONE_WORDS = ("none", "null")


@dataclass(frozen=True)
class ModelConfig:
    """`model.GPTConfig` without `vocab_size` and `seq_len`, which the corpus fixes."""
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int | None = None            # 4 * d_model when None
    attention_impl: str = "auto"       # "auto" or a backend of mgd.backends
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    rope_base: float = 10_000.0
    loss_chunk: int = 1024
    remat_blocks: bool = True
    remat_keeps_attention: bool = False  # block remat keeps attention's (o, lse) instead of rerunning it
    scan_layers: bool = True           # false: a Python loop over the layers (no stacked residuals)
    init_std: float = 0.02


@dataclass(frozen=True)
class ScorerConfig:
    """The distilled scorer: regressors fit to the oracle labels on the base model's
    features (mean-pooled hidden state, per-sequence loss, last-layer gradient alignment
    with the target; `gradient_alignment` adds the whole model's)."""
    regressors: tuple[str, ...] = REGRESSORS
    mlp_hidden: int = 256
    holdout_fraction: float = 0.2
    gradient_alignment: bool = False
    feature_batch: int = 256           # rows per forward pass when extracting features


@dataclass(frozen=True)
class SelectionConfig:
    """The budget every method selects for, the distilled selection's rule, and the
    methods compared. Exactly one of `budget_fraction` (of the corpus's sequences) and
    `budget_tokens` (training tokens, rounded up to whole sequences) is set."""
    budget_fraction: float | None = 0.10
    budget_tokens: int | None = None
    target_modes: int = 4              # 0: the score's top k; M: stratified by M target modes
    target_gate: float = 0.99          # 0: off; else the target-likeness quantile
    knn_k: int = 8                     # knn_target: target rows each corpus row is compared to
    methods: tuple[str, ...] = DEFAULT_METHODS


@dataclass(frozen=True)
class DsirConfig:
    ngrams: int = 2
    num_buckets: int = 10_000
    draw_per_seed: bool = True         # a fresh importance resample per seed (else seed 0's for all)


@dataclass(frozen=True)
class BaselinesConfig:
    dsir: DsirConfig = field(default_factory=DsirConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    population_train: ContinuedConfig = field(default_factory=ContinuedConfig)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's results.

    `corpus.ontarget` / `corpus.offtarget` None: $MGD_DATA_DIR's files, else the hub
    (resolved before the run starts). `target` (a file) or `corpus.target_source` (one
    source of the on-target file): the target's documents, split by document into the
    metagradient target set and the evaluation set (`target.py`); neither: held-out
    on-target documents.
    """
    name: str = "custom"
    seeds: int = 3
    target: str | None = None          # a file of documents that defines the target domain
    loss_batch: int = 256              # rows per batch when only losses are computed
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(ontarget=None, offtarget=None))
    model: ModelConfig = field(default_factory=ModelConfig)
    base_train: TrainConfig = field(default_factory=TrainConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    continued: ContinuedConfig = field(default_factory=ContinuedConfig)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def model_config(self, vocab_size: int | None = None):
        """The `model.GPTConfig` of this run; `vocab_size`: the trained tokenizer's, where
        the corpus is built (default `corpus.vocab_size`, what it is asked for)."""
        from mgd.pipeline.model import GPTConfig
        return GPTConfig(vocab_size=self.corpus.vocab_size if vocab_size is None else vocab_size,
                         seq_len=self.corpus.seq_len, **dataclasses.asdict(self.model))


# ---------------------------------------------------------------------------------------
# Parsing values by a field's type
# ---------------------------------------------------------------------------------------

def _fields(cls) -> dict[str, type]:
    """{field name: resolved type} of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional_inner(tp):
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def type_name(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{type_name(inner)} or none"
    if typing.get_origin(tp) is tuple:
        return f"comma-separated {type_name(typing.get_args(tp)[0])}s"
    return {int: "integer", float: "number", bool: "boolean (true/false)", str: "string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _parse_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError
    text = str(value).strip().replace("_", "")
    try:
        return int(text)
    except ValueError:
        number = float(text)       # 2e6 is a fine way to write a count of tokens
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError from None
        return int(number)


def _parse_float(value) -> float:
    if isinstance(value, bool):
        raise ValueError
    number = float(value) if isinstance(value, (int, float)) else float(str(value).strip())
    if not math.isfinite(number):
        raise ValueError
    return number


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError


def parse_value(value, tp):
    """`value` (command-line text, or a TOML value) as type `tp`; ValueError if it is not."""
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        return parse_value(value, inner)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        items = value if isinstance(value, (list, tuple)) else \
            [v.strip() for v in str(value).split(",") if v.strip()]
        return tuple(parse_value(v, item) for v in items)
    if tp is bool:
        return _parse_bool(value)
    if tp is int:
        return _parse_int(value)
    if tp is float:
        return _parse_float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    raise ValueError(f"cannot parse a {type_name(tp)}")


# ---------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------

def _set_path(obj, parts: list[str], value, walked: list[str], shown: str):
    """A copy of dataclass `obj` with the field at `parts` set from `value` (a dict sets
    several fields of a section, as a TOML table does)."""
    name, rest = parts[0], parts[1:]
    here = ".".join([*walked, name])
    fields = _fields(type(obj))
    if name not in fields:
        scope = f"section {'.'.join(walked)!r}" if walked else "the run config"
        raise UsageError(f"{shown}: {scope} has no field {name!r} (fields: {', '.join(fields)})")
    tp = fields[name]
    if dataclasses.is_dataclass(tp):
        current = getattr(obj, name)
        if rest:
            new = _set_path(current, rest, value, [*walked, name], shown)
        elif isinstance(value, dict):
            new = current
            for key, sub in value.items():
                new = _set_path(new, [key], sub, [*walked, name], shown)
        else:
            raise UsageError(f"{shown}: {here} is a section; set one of its fields "
                             f"({', '.join(_fields(tp))}) as {here}.FIELD=VALUE")
    else:
        if rest or isinstance(value, dict):
            raise UsageError(f"{shown}: {here} is {_a(type_name(tp))}, not a section")
        try:
            new = parse_value(value, tp)
        except ValueError:
            raise UsageError(f"{shown}: {here} must be {_a(type_name(tp))}, got {value!r}") from None
    try:
        return dataclasses.replace(obj, **{name: new})
    except (ValueError, TypeError) as err:   # the section's own checks (__post_init__)
        raise UsageError(f"{shown}: {err}") from None


def apply_overrides(cfg: RunConfig, assignments, source: str = "--set") -> RunConfig:
    """`cfg` with each (dotted path, value) of `assignments` applied in order."""
    for path, value in assignments:
        parts = path.split(".")
        if not all(parts):
            raise UsageError(f"{source} {path}: not a dotted field path (e.g. oracle.k)")
        shown = f"{source} {path}={value}" if source == "--set" else f"{source}: {path}"
        cfg = _set_path(cfg, parts, value, [], shown)
    return cfg


def parse_assignment(text: str) -> tuple[str, str]:
    """`section.field=value` -> (path, value text)."""
    path, eq, value = text.partition("=")
    if not eq or not path.strip():
        raise UsageError(f"--set {text}: expected SECTION.FIELD=VALUE (e.g. oracle.k=32)")
    return path.strip(), value.strip()


def load_toml(path) -> list[tuple[str, object]]:
    """A TOML file's settings as (dotted path, value) assignments, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--config {path}: not valid TOML ({err})") from None

    def flatten(table, prefix):
        for key, value in table.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    return list(flatten(data, ""))


# ---------------------------------------------------------------------------------------
# Printing and pinning
# ---------------------------------------------------------------------------------------

def _toml_value(value) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))      # a JSON string is a valid TOML basic string


def to_toml(cfg) -> str:
    """The config as TOML: scalars first, then one table per section (nested as
    [baselines.dsir]); `load_toml` of it gives the same config back."""
    lines: list[str] = []

    def emit(obj, prefix):
        sections = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                sections.append((f.name, value))
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        for name, value in sections:
            if any(not dataclasses.is_dataclass(getattr(value, f.name))
                   for f in dataclasses.fields(value)):
                lines.extend(["", f"[{prefix}{name}]"])
            emit(value, f"{prefix}{name}.")
    emit(cfg, "")
    return "\n".join(lines) + "\n"


def to_plan(cfg: RunConfig) -> dict:
    """The config as plain JSON (tuples become lists), as `plan.json` holds it."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def plan_differences(saved: dict, plan: dict, prefix: str = "") -> list[str]:
    """Dotted paths where two plans differ."""
    out = []
    for key in sorted(set(saved) | set(plan)):
        a, b = saved.get(key), plan.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += plan_differences(a, b, f"{prefix}{key}.")
        elif a != b or (key in saved) != (key in plan):
            out.append(f"{prefix}{key}")
    return out


# ---------------------------------------------------------------------------------------
# Checks that need no machine and no files
# ---------------------------------------------------------------------------------------

def validate(cfg: RunConfig) -> None:
    """UsageError naming the field, for settings that cannot run together."""
    sel = cfg.selection
    if (sel.budget_fraction is None) == (sel.budget_tokens is None):
        raise UsageError("selection.budget_fraction and selection.budget_tokens: set exactly "
                         "one (the other to none); the CLI's --budget-fraction and "
                         "--budget-tokens do this")
    if sel.budget_fraction is not None and not 0 < sel.budget_fraction <= 1:
        raise UsageError(f"selection.budget_fraction must be in (0, 1], got {sel.budget_fraction}")
    if sel.budget_tokens is not None and sel.budget_tokens < 1:
        raise UsageError(f"selection.budget_tokens must be >= 1, got {sel.budget_tokens}")
    if not 0 <= sel.target_modes <= cfg.corpus.n_target:
        raise UsageError(f"selection.target_modes must be between 0 and the target set's "
                         f"{cfg.corpus.n_target} sequences, got {sel.target_modes}")
    if not 1 <= sel.knn_k <= cfg.corpus.n_target:
        raise UsageError(f"selection.knn_k must be between 1 and the target set's "
                         f"{cfg.corpus.n_target} sequences, got {sel.knn_k}")
    if cfg.target is not None and cfg.corpus.target_source is not None:
        raise UsageError("--target and --target-source (corpus.target_source): give one; "
                         "each defines the target")
    if not 0 <= sel.target_gate <= 1:
        raise UsageError(f"selection.target_gate must be a quantile in [0, 1] (0: off), "
                         f"got {sel.target_gate}")
    unknown = [m for m in sel.methods if m not in METHODS]
    if unknown or not sel.methods or len(set(sel.methods)) != len(sel.methods):
        raise UsageError(f"selection.methods: {', '.join(unknown) or 'empty or repeated'}; "
                         f"choose from {', '.join(METHODS)}")
    bad = [r for r in cfg.scorer.regressors if r not in REGRESSORS]
    if bad or not cfg.scorer.regressors:
        raise UsageError(f"scorer.regressors: {', '.join(bad) or 'empty'}; choose from "
                         f"{', '.join(REGRESSORS)}")
    if not 0 < cfg.scorer.holdout_fraction < 1:
        raise UsageError(f"scorer.holdout_fraction must be in (0, 1), got "
                         f"{cfg.scorer.holdout_fraction}")
    if cfg.model.attention_impl not in ATTENTION_IMPLS:
        raise UsageError(f"--attention-impl {cfg.model.attention_impl}: unknown backend; "
                         f"choose from {', '.join(ATTENTION_IMPLS)}")
    for name, value in (("seeds", cfg.seeds), ("loss_batch", cfg.loss_batch),
                        ("scorer.feature_batch", cfg.scorer.feature_batch),
                        ("scorer.mlp_hidden", cfg.scorer.mlp_hidden)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    try:
        cfg.model_config()
    except ValueError as err:
        raise UsageError(f"model: {err}") from None
