"""The `mgd` command.

    mgd run --preset {smoke,demo,full} [--ontarget FILE] [--offtarget FILE] [--target FILE]
            [--out DIR] [--budget B] [--seeds N] [--attention-impl IMPL]

Corpus sources: --ontarget/--offtarget (JSON lines with a `text` field, .jsonl or
.jsonl.gz, or `hf:<dataset>:<config>:<field>` for a hub dataset); else the folder in
$MGD_DATA_DIR (ontarget.jsonl.gz, offtarget.jsonl.gz); else PubMed and C4 streamed
from the Hugging Face hub.
"""
from __future__ import annotations

import argparse
import sys


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive: a fraction of the corpus (<= 1) "
                                         "or a number of training tokens (> 1)")
    return value


def _int_at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}")
        return value
    return parse


def _quantile(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from mgd.pipeline.presets import PRESETS
    parser = argparse.ArgumentParser(prog="mgd", description="MetaGrad-Distill")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the data-selection experiment",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--preset", choices=sorted(PRESETS), default="smoke",
                   help="experiment size (default: smoke)")
    r.add_argument("--ontarget", metavar="FILE", help="on-target documents (JSON lines)")
    r.add_argument("--offtarget", metavar="FILE", help="off-target documents (JSON lines)")
    r.add_argument("--target", metavar="FILE",
                   help="documents defining the target domain (JSON lines), instead of "
                        "held-out on-target documents")
    r.add_argument("--out", metavar="DIR", help="run folder (default: runs/<preset>)")
    r.add_argument("--budget", type=_budget,
                   help="selection budget: fraction of the corpus (<= 1, default 0.1) or "
                        "training tokens (> 1)")
    r.add_argument("--seeds", type=_int_at_least(1), help="seeds per method (default 3)")
    r.add_argument("--attention-impl", metavar="IMPL",
                   help="attention kernel: auto, xla, pallas, triton or cuda")
    r.add_argument("--gradient-alignment", action=argparse.BooleanOptionalAction, default=None,
                   help="add each sequence's whole-model gradient alignment with the target "
                        "to the scorer's features (a backward pass and a pass back through "
                        "it over the corpus; default: the preset's setting, off)")
    r.add_argument("--per-unit-gradient", action=argparse.BooleanOptionalAction, default=None,
                   help="fit the scorer to each oracle label divided by its sequence's "
                        "gradient norm in the inner Adam's geometry (default: the preset's "
                        "setting, off)")
    r.add_argument("--target-modes", type=_int_at_least(0), metavar="M",
                   help="stratify the distilled selection by M modes of the target set "
                        "(k-means on the base model's hidden states; each mode's quota of "
                        "the budget follows its share of the target, filled by the score); "
                        "0: the score's top k (default: the preset's setting)")
    r.add_argument("--target-gate", type=_quantile, metavar="Q",
                   help="gate the distilled selection by likeness to the target: rows "
                        "farther from their target mode than the Q quantile of the "
                        "target's own rows are taken only when no other row is left; "
                        "0: off (default: the preset's setting)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--quiet", action="store_true", help="no output except errors")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from mgd.pipeline.run import run
        from mgd.pipeline.sources import HubUnavailable
        try:
            run(args.preset, out=args.out, ontarget=args.ontarget, offtarget=args.offtarget,
                target=args.target, budget=args.budget, seeds=args.seeds,
                attention_impl=args.attention_impl, gradient_alignment=args.gradient_alignment,
                per_unit_gradient=args.per_unit_gradient, target_modes=args.target_modes,
                target_gate=args.target_gate,
                progress=not args.no_progress,
                quiet=args.quiet)
        except (FileNotFoundError, ValueError) as err:
            print(f"mgd run: error: {err}", file=sys.stderr)
            return 2
        except HubUnavailable as err:
            print(f"mgd run: error: {err}\nOffline, give --ontarget/--offtarget files or set "
                  f"MGD_DATA_DIR to a folder with ontarget.jsonl.gz and offtarget.jsonl.gz.",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
