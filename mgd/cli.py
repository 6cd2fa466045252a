"""The `mgd` command: `mgd run` runs (or resumes) the data-selection experiment.

A user's mistake (a bad option, a missing file, a machine that cannot run the asked-for
backend) ends in one line, `mgd: error: ...`, and exit status 2; Ctrl-C in exit status
130 with a line saying the same command resumes the run. Any other exception is a bug
and keeps its traceback. Progress goes to stderr through `logging` (INFO; --quiet:
warnings only); the final summary table goes to stdout.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from mgd.errors import UsageError

RUN_DESCRIPTION = """\
Run (or resume) the data-selection experiment: corpus, base model, metagradient
oracle, distilled scorer, every method's selection, continued pretraining, report.

Settings come from, later overriding earlier: the preset; --config FILE.toml; the
options below; --set SECTION.FIELD=VALUE (repeatable). `--dry-run` prints the resolved
settings as TOML (sections: corpus, model, base_train, oracle, scorer, selection,
baselines.dsir, baselines.population, baselines.population_train, continued) and runs
nothing; that output is a valid --config file. Examples:

    mgd run --preset smoke --out runs/smoke
    mgd run --preset smoke --set oracle.rounds=96 --set scorer.gradient_alignment=true
    mgd run --preset smoke --budget-tokens 2e4 --set selection.methods=metagrad_distilled,random
    mgd run --preset demo --dry-run > demo.toml; mgd run --config demo.toml --yes
    mgd run --preset smoke --target my_abstracts.jsonl
    mgd run --preset demo --yes --target-source EBM-NLP

A target of your own (--target FILE, or --target-source NAME for one source of the
on-target file) is split by document into the metagradient target set and the held-out
evaluation set every method's loss is measured on; without one, both are held-out
on-target documents.

Corpus sources: --ontarget/--offtarget (JSON lines with a `text` field, .jsonl or
.jsonl.gz, or `hf:<dataset>:<config>:<field>` for a hub dataset); else the folder in
$MGD_DATA_DIR (ontarget.jsonl.gz, offtarget.jsonl.gz); else PubMed and C4 streamed
from the Hugging Face hub.
"""

INTERRUPTED = ("run stopped (interrupted); run the same command again to resume it from "
               "its last finished stage")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one `mgd: error:` line like every other."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _token_count(text: str) -> int:
    value = _number(text)
    if not (value >= 1 and value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens >= 1, got {text}")
    return int(value)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def build_parser(run_options: bool = True) -> argparse.ArgumentParser:
    """The whole parser; with run_options=False, `run` without its options (enough for
    `mgd --help` and `mgd --version`, and it does not import JAX)."""
    from mgd import __version__
    parser = _Parser(prog="mgd", description="MetaGrad-Distill")
    parser.add_argument("--version", action="version", version=f"mgd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run (or resume) the data-selection experiment",
                       description=RUN_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if not run_options:
        return parser
    from mgd.pipeline.config import ATTENTION_IMPLS
    from mgd.pipeline.presets import PRESETS
    r.add_argument("--preset", choices=sorted(PRESETS), default="smoke",
                   help="experiment size: smoke (CPU, minutes), demo and full (sized for one "
                        "H200) (default: smoke)")
    r.add_argument("--config", metavar="FILE.toml",
                   help="TOML file of settings over the preset's, laid out as --dry-run prints "
                        "them (default: none)")
    r.add_argument("--set", dest="assignments", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE",
                   help="override one setting, parsed by the field's type, e.g. oracle.k=32, "
                        "scorer.gradient_alignment=true, corpus.max_docs=none, "
                        "selection.methods=random,dsir; repeatable (default: none)")
    r.add_argument("--ontarget", metavar="FILE",
                   help="on-target documents, JSON lines (default: $MGD_DATA_DIR/ontarget.jsonl.gz, "
                        "else PubMed from the hub)")
    r.add_argument("--offtarget", metavar="FILE",
                   help="off-target documents, JSON lines (default: $MGD_DATA_DIR/"
                        "offtarget.jsonl.gz, else C4 from the hub)")
    r.add_argument("--target", metavar="FILE",
                   help="documents defining the target domain, JSON lines, split by document "
                        "into the target set and the evaluation set (default: held-out "
                        "on-target documents)")
    r.add_argument("--target-source", metavar="NAME",
                   help="the on-target file's documents whose `source` field is NAME (or "
                        "begins with it) as the target, split like --target; the other "
                        "sources stay in the corpus (default: none)")
    r.add_argument("--out", metavar="DIR", help="run folder (default: runs/<preset>)")
    budget = r.add_mutually_exclusive_group()
    budget.add_argument("--budget-fraction", type=_fraction, metavar="F",
                        help="selection budget as a fraction of the corpus's sequences, in "
                             "(0, 1] (default: the preset's, 0.1 in every preset)")
    budget.add_argument("--budget-tokens", type=_token_count, metavar="N",
                        help="selection budget in training tokens, e.g. 2e6, rounded up to "
                             "whole sequences (default: none; the preset's fraction)")
    r.add_argument("--seeds", type=_int_at_least(1), metavar="N",
                   help="training seeds per method (default: the preset's, 3 in every preset)")
    r.add_argument("--attention-impl", metavar="IMPL",
                   help=f"attention kernel: {', '.join(ATTENTION_IMPLS)} (default: auto, the "
                        f"fastest this machine has)")
    r.add_argument("--memory-budget", metavar="SIZE",
                   help="device memory the oracle's rounds may use, e.g. 16GB or 80GiB: the "
                        "memory planner picks the fastest round program that fits (sets "
                        "oracle.memory_budget and oracle.auto_plan) (default: the preset's; "
                        "the device's own limit when the planner is on)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the resolved settings as TOML, the oracle's round program and "
                        "each stage's expected time and memory, and exit without running")
    r.add_argument("--devices", type=_int_at_least(1), metavar="N",
                   help="with --dry-run: the number of devices (all processes together) to "
                        "plan the run for (default: 1)")
    d = r.add_argument_group(
        "several processes (jax.distributed; one command per host, the run folder on a "
        "shared filesystem; docs/planner.md)")
    d.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address (default: $JAX_COORDINATOR_ADDRESS)")
    d.add_argument("--num-processes", type=_int_at_least(1), metavar="N",
                   help="processes in all (default: $JAX_NUM_PROCESSES, else one)")
    d.add_argument("--process-id", type=_int_at_least(0), metavar="I",
                   help="this process, 0 to N-1 (default: $JAX_PROCESS_ID)")
    d.add_argument("--distributed", action="store_true",
                   help="take what is not given from the cluster (SLURM, Open MPI), as "
                        "jax.distributed.initialize() detects it")
    r.add_argument("--yes", action="store_true",
                   help="run a preset sized for a GPU on a machine without one (default: refuse)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--quiet", action="store_true",
                   help="only warnings and errors on stderr, no progress bars, no summary")
    return parser


def build_config(args):
    """The run's RunConfig: the preset, then --config, then the options, then --set."""
    from mgd.pipeline import config as cfg_mod
    from mgd.pipeline import presets
    cfg = presets.get(args.preset)
    if args.config:
        cfg = cfg_mod.apply_overrides(cfg, cfg_mod.load_toml(args.config),
                                      source=f"--config {args.config}")
    options = [("--ontarget", "corpus.ontarget", args.ontarget),
               ("--offtarget", "corpus.offtarget", args.offtarget),
               ("--target", "target", args.target),
               ("--target-source", "corpus.target_source", args.target_source),
               ("--seeds", "seeds", args.seeds),
               ("--attention-impl", "model.attention_impl", args.attention_impl),
               ("--memory-budget", "oracle.memory_budget", args.memory_budget)]
    for option, path, value in options:
        if value is not None:
            cfg = cfg_mod.apply_overrides(cfg, [(path, value)], source=option)
    if args.budget_fraction is not None:
        cfg = cfg_mod.apply_overrides(cfg, [("selection.budget_fraction", args.budget_fraction),
                                            ("selection.budget_tokens", "none")],
                                      source="--budget-fraction")
    if args.budget_tokens is not None:
        cfg = cfg_mod.apply_overrides(cfg, [("selection.budget_tokens", args.budget_tokens),
                                            ("selection.budget_fraction", "none")],
                                      source="--budget-tokens")
    if args.memory_budget is not None:
        cfg = cfg_mod.apply_overrides(cfg, [("oracle.auto_plan", True)], source="--memory-budget")
    return cfg_mod.apply_overrides(cfg, [cfg_mod.parse_assignment(a) for a in args.assignments])


def _print_plan(cfg, devices: int) -> None:
    """The oracle's round program and the run on paper, as TOML comments."""
    from mgd.pipeline import planner, stage_rates
    print("\n# The oracle's round program (docs/planner.md):")
    for line in planner.dry_run_lines(cfg, devices):
        print(f"#   {line}")
    print(f"# The run on paper, {devices} device{'s' if devices > 1 else ''} "
          "(measured rates, pipeline/stage_rates.py):")
    for line in stage_rates.plan_lines(cfg, devices):
        print(f"#   {line}")


def connect_processes(args):
    """jax.distributed for a run of several processes (from the options or the
    environment); the run's `Processes`."""
    from mgd.pipeline import distributed
    try:
        env = distributed.from_env()
        if (args.coordinator or args.num_processes is not None or args.process_id is not None
                or args.distributed or "num_processes" in env):
            return distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                          detect=args.distributed)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return distributed.current()


class _Elapsed(logging.Formatter):
    """`[mgd   12.3s] message`: seconds since the command started."""

    def __init__(self):
        super().__init__("%(message)s")
        self.t0 = time.perf_counter()

    def format(self, record):
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        return f"[mgd {time.perf_counter() - self.t0:7.1f}s] {level}{super().format(record)}"


def configure_logging(quiet: bool) -> None:
    """The library's loggers (`mgd.*`) to stderr: INFO, or WARNING with --quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Elapsed())
    logger = logging.getLogger("mgd")
    logger.handlers = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _run(args) -> int:
    from mgd.pipeline import config as cfg_mod
    from mgd.pipeline import run as run_mod
    configure_logging(args.quiet)
    if args.devices is not None and not args.dry_run:
        raise UsageError("--devices: only with --dry-run (a run uses the devices it is given)")
    cfg = run_mod.prepare(build_config(args))
    if args.dry_run:
        print(f"# mgd run --preset {args.preset}: the resolved settings (a valid --config file)")
        print(cfg_mod.to_toml(cfg), end="")
        _print_plan(cfg, args.devices or 1)
        return 0
    processes = connect_processes(args)
    result = run_mod.run_prepared(cfg, args.out, progress=not (args.no_progress or args.quiet),
                                  yes=args.yes, processes=processes)
    if result is None:   # a process other than the first: its share is merged
        return 0
    if not args.quiet:
        from mgd.pipeline import report
        rho = report.spearman_vs_labels(result.scorer_summary)
        print(report.format_summary(result.summary))
        print(f"\nscorer held-out Spearman {rho:.3f} ({result.scorer_summary['winner']}); "
              f"on-target share of its top 10%: {100 * result.top_share:.1f}%")
    return 0


def main(argv=None) -> int:
    try:
        words = sys.argv[1:] if argv is None else list(argv)
        # The run options' choices come from the pipeline, which imports JAX: only for `run`.
        args = build_parser(run_options="run" in words).parse_args(words)
        if args.command == "run":
            return _run(args)
        return 0
    except UsageError as err:
        print("mgd: error: " + " ".join(str(err).split("\n")), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mgd: {INTERRUPTED}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
