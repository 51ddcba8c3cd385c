"""The `slug-fast` command line (also `python -m slug_fast`)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import SlugError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULT_CONCEPT

    parser = _Parser(prog="slug-fast", description="Unlearn a concept by editing one layer once (SLUG).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="forget a digit from the built-in mini-CLIP; prints a JSON report",
                          description="Train the built-in digits mini-CLIP (seconds), forget one digit with "
                          "SLUG, print the JSON report and, with --out, write report.json and the delta.")
    demo.add_argument("--forget", default=DEFAULT_CONCEPT, metavar="DIGIT",
                      help=f"digit to forget, by name or numeral (default: {DEFAULT_CONCEPT})")
    demo.add_argument("--out", metavar="DIR", help="directory for report.json and delta/ (created if missing)")
    demo.add_argument("--epochs", type=_positive_int, help="training epochs of the built-in model")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split and the training (default 0)")
    demo.add_argument("--strategy", choices=["best", "deepest"], default="best",
                      help="search every front layer and keep the best, or only the deepest (default best)")
    demo.add_argument("--max-evals", type=_positive_int, default=10, help="step-search budget per layer (10)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("backends", help="which compute backends are usable here, as JSON")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "backends":
            from ._backends import availability
            out = {name: {"available": reason is None, "reason": reason} for name, reason in availability().items()}
        else:
            from .demo import concept_label, run_demo
            concept_label(args.forget)  # refuse a bad digit before training anything
            out = run_demo(args.forget, args.out, epochs=args.epochs, seed=args.seed, strategy=args.strategy,
                           max_evals=args.max_evals, progress=False if args.quiet else None)
    except SlugError as err:
        print(f"slug-fast: error: {err}", file=sys.stderr)
        return 2
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
