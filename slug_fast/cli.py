"""The `slug-fast` command line (also `python -m slug_fast`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import CriterionNotReached, SlugError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2 (under torchrun, from
    rank 0 only: every rank parses the same arguments)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if os.environ.get("RANK", "0") == "0" else None)


def build_parser() -> argparse.ArgumentParser:
    from .compare import METHODS as COMPARE_METHODS
    from .demo import DEFAULT_CONCEPT

    parser = _Parser(prog="slug-fast", description="Unlearn a concept by editing one layer once (SLUG).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="forget a digit (or several) from the built-in mini-CLIP; prints a JSON report",
                          description="Load the mini-CLIP the package ships (trained on scikit-learn's digits), "
                          "forget one digit with SLUG (several, 'seven,three', with unlearn_many), print the JSON "
                          "report and, with --out, write report.json, report.md, the Pareto plots (and "
                          "interference.png) and the delta.")
    demo.add_argument("--forget", default=DEFAULT_CONCEPT, metavar="DIGITS",
                      help=f"digit(s) to forget, by name or numeral, comma-separated, in the order applied "
                      f"(default: {DEFAULT_CONCEPT})")
    demo.add_argument("--out", metavar="DIR", help="directory for report.json and delta/ (created if missing)")
    demo.add_argument("--epochs", type=_positive_int,
                      help="train the mini-CLIP for this many epochs instead of loading the shipped weights")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the data split and the training; not 0 trains a new model (default 0)")
    demo.add_argument("--strategy", choices=["best", "deepest"], default="best",
                      help="search every front layer and keep the best, or only the deepest (default best)")
    demo.add_argument("--max-evals", type=_positive_int, default=10, help="step-search budget per layer (10)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    un = sub.add_parser(
        "unlearn", help="unlearn a concept (or several) from a CLIP model on your data; writes the delta and reports",
        description="Unlearn a concept from an open_clip or Hugging Face CLIP model with SLUG. Writes "
        "delta/, report.json, report.md, pareto_<tower>.png and similarity.png to --out; prints the "
        "report as JSON. Several concepts (--concept repeated, or --concepts @file) are forgotten together "
        "with unlearn_many into one delta, with pareto_<concept>_<tower>.png and interference.png.")
    _model_args(un)
    un.add_argument("--concept", action="append", help="the name to forget, as captions spell it (repeatable: "
                    "several concepts at once)")
    un.add_argument("--concepts", metavar="@FILE", help="the concepts to forget, one a line, aliases after '|' "
                    "('Elon Musk | Musk'); blank lines and # comments ignored (instead of --concept)")
    un.add_argument("--alias", action="append", default=[], help="another spelling of the concept (repeatable; "
                    "one concept only)")
    un.add_argument("--order", choices=["given", "importance"],
                    help="several concepts: apply them in the order given or most important layer first (given)")
    un.add_argument("--share-layers", action="store_true",
                    help="several concepts: let a concept edit a layer an earlier one edits (default: each its own)")
    un.add_argument("--class-names", required=True, metavar="NAMES",
                    help="zero-shot classes, 'a,b,c' or @file (one per line); the concept(s) added if missing")
    un.add_argument("--data", metavar="SRC", help="captioned images to split by the concept: WebDataset "
                    ".tar shard(s) (brace patterns, a folder of shards) or an image folder with captions.tsv")
    un.add_argument("--forget-data", metavar="SRC", help="captioned images of the concept (instead of --data)")
    un.add_argument("--retain-data", metavar="SRC", help="captioned images to keep (instead of --data)")
    un.add_argument("--eval-data", metavar="SRC", help="held-out captioned images for the criterion, the "
                    "report and membership inference (default: the forget and retain images)")
    un.add_argument("--top-k", type=_positive_int, default=5,
                    help="criterion: the concept's zero-shot top-k accuracy is 0 (default 5, as in the paper)")
    un.add_argument("--strategy", choices=["best", "deepest"], default="best",
                    help="search every front layer and keep the best, or only the deepest (default best)")
    un.add_argument("--tower", choices=["vision", "text"], help="edit only this tower")
    un.add_argument("--max-evals", type=_positive_int, default=10, help="step-search budget per layer (10)")
    un.add_argument("--batch-size", type=_positive_int, default=32, help="pairs per gradient batch (32)")
    un.add_argument("--limit", type=_positive_int, help="read at most this many pairs from each source")
    un.add_argument("--memory-budget", metavar="SIZE", type=_budget,
                    help="memory SLUG may use above the loaded model: bytes, '12GB', '512MiB', or '0.5x' the "
                    "weights; the gradient pass then runs in as few passes as fit (default: no limit)")
    un.add_argument("--checkpointing", action="store_true",
                    help="recompute activations in backward (less memory, about one more forward)")
    un.add_argument("--timeout", type=_positive_int, default=600, metavar="SECONDS",
                    help="under torchrun: the longest any collective may wait for the other ranks (600)")
    un.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    un.add_argument("--quiet", action="store_true", help="no progress bars")

    ev = sub.add_parser("eval", help="score a model (a delta applied, if given) on the paper's Table 1 metrics",
                        description="Score a CLIP model, with --delta applied if given (from `slug-fast unlearn` "
                        "or any tool that writes one), the way `slug-fast unlearn` and `compare` score theirs: the "
                        "concept's zero-shot top-1/top-k accuracy among --class-names and the other classes' on "
                        "--eval-data, zero-shot top-1 on a labelled --utility-data folder, and membership "
                        "inference given the pairs trained on. Writes eval.json to --out; prints it as JSON.")
    _model_args(ev)
    ev.add_argument("--delta", metavar="DIR", help="a delta directory to apply before scoring")
    ev.add_argument("--no-verify-base", action="store_true",
                    help="apply --delta even if the model's tensors are not the ones it was computed on")
    ev.add_argument("--concept", required=True, help="the concept forgotten, as captions spell it")
    ev.add_argument("--alias", action="append", default=[], help="another spelling of the concept (repeatable)")
    ev.add_argument("--class-names", required=True, metavar="NAMES",
                    help="zero-shot classes, 'a,b,c' or @file (one per line); the concept added if missing")
    ev.add_argument("--eval-data", required=True, metavar="SRC", help="held-out captioned images (shards or an "
                    "image folder with captions.tsv); a caption naming one class labels its image")
    ev.add_argument("--data", metavar="SRC", help="the pairs unlearned on, split by the concept, for membership "
                    "inference (or --forget-data)")
    ev.add_argument("--forget-data", metavar="SRC", help="the concept's pairs unlearned on, for membership inference")
    ev.add_argument("--utility-data", metavar="DIR", help="a labelled folder for zero-shot utility, one subfolder "
                    "of images per class (ImageNet's validation layout)")
    ev.add_argument("--utility-classes", metavar="NAMES", help="the utility folders' class names: 'imagenet' "
                    "(open_clip's names for ImageNet's sorted WordNet-id folders), @file ('folder<TAB>name' lines) "
                    "or 'a,b,c' in sorted folder order (default: the folder names)")
    ev.add_argument("--utility-templates", metavar="@FILE", help="zero-shot templates for utility, one a line with "
                    "'{}' for the class name (default: CLIP's ImageNet ensemble)")
    ev.add_argument("--utility-per-class", type=_positive_int, metavar="N",
                    help="score at most N images of each utility class")
    ev.add_argument("--top-k", type=_positive_int, default=5, help="also report top-k accuracy (default 5)")
    ev.add_argument("--limit", type=_positive_int, help="read at most this many pairs from each source")
    ev.add_argument("--out", required=True, metavar="DIR", help="directory for eval.json (created if missing)")

    ap = sub.add_parser("apply", help="apply a saved delta to a model and save the edited model",
                        description="Apply a delta written by `slug-fast unlearn` (or result.save) to a model "
                        "and save it to --out: open_clip as open_clip_config.json + safetensors (load it with "
                        "'local-dir:OUT'), Hugging Face with save_pretrained.")
    _model_args(ap)
    ap.add_argument("--delta", required=True, metavar="DIR", help="the delta directory")
    ap.add_argument("--out", required=True, metavar="DIR", help="where to save the edited model")
    ap.add_argument("--no-verify-base", action="store_true",
                    help="apply even if the model's tensors are not the ones the delta was computed on")
    rv = sub.add_parser("revert", help="undo a revertible delta on a model and save the restored model",
                        description="Restore the original tensors a revertible delta (written by `slug-fast "
                        "unlearn`, `demo` or result.save(dir, revertible=True)) stores, bit for bit, after checking "
                        "that the model holds exactly what applying the delta produced; save it to --out as "
                        "`apply` does.")
    _model_args(rv)
    rv.add_argument("--delta", required=True, metavar="DIR", help="the delta directory")
    rv.add_argument("--out", required=True, metavar="DIR", help="where to save the restored model")
    cmp_ = sub.add_parser("compare", help="SLUG vs FT/GA/GAFT/SalUn/SSD and the authors' way, on the demo task "
                          "or your CLIP model and data",
                          description="Run SLUG, slug-authors and the baselines (each over its grid, early "
                          "stopped) on the demo task or, with --model, on your CLIP model and data (the paper's "
                          "Table 1: forget top-1/top-k, the other classes' top-1, zero-shot utility, MIA, cost), "
                          "each in a fresh process; print the rows (each with every setting it tried) as JSON and, "
                          "with --out, write them to compare.json, with compare.md and compare.png.")
    cmp_.add_argument("--forget", default=DEFAULT_CONCEPT, metavar="DIGIT", help="without --model: the digit to "
                      f"forget (default: {DEFAULT_CONCEPT})")
    cmp_.add_argument("--model", help="your CLIP model (as for `unlearn`); the flags below then describe the task")
    cmp_.add_argument("--pretrained", help="open_clip pretrained tag or checkpoint file")
    cmp_.add_argument("--device", default="cpu", help="torch device (default cpu)")
    cmp_.add_argument("--concept", help="with --model: the name to forget, as captions spell it")
    cmp_.add_argument("--alias", action="append", default=[], help="another spelling of the concept (repeatable)")
    cmp_.add_argument("--class-names", metavar="NAMES", help="with --model: zero-shot classes, 'a,b,c' or @file")
    cmp_.add_argument("--data", metavar="SRC", help="captioned images to split by the concept (as for `unlearn`)")
    cmp_.add_argument("--forget-data", metavar="SRC", help="captioned images of the concept (instead of --data)")
    cmp_.add_argument("--retain-data", metavar="SRC", help="captioned images to keep (instead of --data)")
    cmp_.add_argument("--eval-data", metavar="SRC", help="held-out captioned images for the criterion, the "
                      "scores and membership inference (default: the forget and retain images)")
    cmp_.add_argument("--utility-data", metavar="DIR", help="a labelled folder for zero-shot utility (as for `eval`)")
    cmp_.add_argument("--utility-classes", metavar="NAMES", help="its class names: imagenet, @file or 'a,b,c'")
    cmp_.add_argument("--utility-templates", metavar="@FILE", help="zero-shot templates for utility, one a line")
    cmp_.add_argument("--utility-per-class", type=_positive_int, metavar="N", help="at most N images per class")
    cmp_.add_argument("--top-k", type=_positive_int, default=5, help="criterion: top-k accuracy is 0 (default 5)")
    cmp_.add_argument("--batch-size", type=_positive_int, default=32, help="pairs per gradient batch (32)")
    cmp_.add_argument("--limit", type=_positive_int, help="read at most this many pairs from each source")
    cmp_.add_argument("--max-evals", type=_positive_int, default=10, help="SLUG's step-search budget per layer (10)")
    cmp_.add_argument("--memory-budget", metavar="SIZE", help="SLUG's memory budget (as for `unlearn`)")
    cmp_.add_argument("--out", metavar="DIR", help="directory for compare.json, compare.md and compare.png")
    cmp_.add_argument("--methods", default=",".join(COMPARE_METHODS),
                      help=f"comma-separated subset of {','.join(COMPARE_METHODS)}")
    cmp_.add_argument("--quiet", action="store_true", help="no progress lines")
    sub.add_parser("backends", help="which compute backends are usable here, as JSON")
    return parser


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="open_clip architecture (with --pretrained), "
                        "hf-hub:org/repo, a Hugging Face id, or a local model directory")
    parser.add_argument("--pretrained", help="open_clip pretrained tag or checkpoint file (e.g. laion400m_e32)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _before_after(report: dict) -> str:
    """A short human-readable table of a report (stderr; stdout stays JSON)."""
    lines = [f"forgot {report['concept']!r} by editing {', '.join(report['layer'])} (step {report['step']:.4g}) "
             f"in {report['seconds']['total']:.2f} s"]
    for group in ("forget", "retain"):
        for key, before in report[group].items():
            if key.endswith("_before"):
                name = key.removesuffix("_before")
                lines.append(f"  {group} {name:<5} {before:7.2f}% -> {report[group][name + '_after']:7.2f}%")
    return "\n".join(lines)


def _many_before_after(report: dict) -> str:
    """_before_after for several concepts."""
    run = report["unlearn"]
    lines = [f"forgot {', '.join(map(repr, run['order']))} in {report['seconds']['total']:.2f} s "
             f"({run['rounds']} verification round(s))"]
    for name, concept in run["concepts"].items():
        lines.append(f"  {name:<8} {', '.join(concept['edited'])} (step {concept['step']:.4g}): top-1 "
                     f"{report['forget'][f'{name}_top1_before']:.2f}% -> {report['forget'][f'{name}_top1_after']:.2f}%")
    lines.append(f"  kept digits top-1 {report['kept']['top1_before']:.2f}% -> {report['kept']['top1_after']:.2f}%")
    return "\n".join(lines)


def _unlearn_concepts(parser: argparse.ArgumentParser, args) -> dict[str, tuple[str, ...]]:
    """`unlearn`'s concepts (name -> aliases), or a usage error (exit 2, one line) for a list
    that cannot be read or for flags that do not go with one concept or with several."""
    from .distributed import launched
    from .job import concept_list

    try:
        concepts = concept_list(args.concept or (), args.concepts, args.alias)
    except (SlugError, OSError) as err:
        parser.error(_one_line(err))
    if len(concepts) == 1:
        if args.order is not None or args.share_layers:
            parser.error("--order and --share-layers order and separate several concepts; with one concept "
                         "leave them out")
        return concepts
    several = f"with several concepts ({len(concepts)})"
    if launched():
        parser.error(f"{several} `unlearn` runs on one process: run it without torchrun, or one concept at a time")
    if args.forget_data is not None or args.retain_data is not None:
        parser.error(f"{several} give --data SRC, split by the captions that mention each concept; "
                     "--forget-data and --retain-data hold one concept's pairs")
    if args.data is None:
        parser.error(f"{several} give --data SRC, split by the captions that mention each concept")
    if args.memory_budget is not None:
        parser.error(f"{several} every concept's gradients stay in memory (unlearn_many keeps the full store): "
                     "leave --memory-budget out, or forget one concept at a time")
    return concepts


def _compare(parser: argparse.ArgumentParser, args, methods: list[str]) -> list[dict]:
    """`compare` on the demo task, or with --model on the user's model and data."""
    from .compare import ModelTask, run_compare, run_compare_model

    task_flags = {"--concept": args.concept, "--class-names": args.class_names, "--data": args.data,
                  "--forget-data": args.forget_data, "--retain-data": args.retain_data,
                  "--eval-data": args.eval_data, "--utility-data": args.utility_data,
                  "--pretrained": args.pretrained, "--memory-budget": args.memory_budget}
    progress = False if args.quiet else None
    if args.model is None:
        given = [flag for flag, value in task_flags.items() if value is not None]
        if given:
            parser.error(f"{given[0]} describes your model's task: give --model too (without it, compare runs "
                         "the demo task, --forget DIGIT)")
        return run_compare(args.forget, args.out, methods=methods, progress=progress)
    for flag in ("--concept", "--class-names"):
        if task_flags[flag] is None:
            parser.error(f"compare --model needs {flag}")
    if args.data is not None and (args.forget_data is not None or args.retain_data is not None):
        parser.error("give either --data (split by the concept) or both --forget-data and --retain-data, not both")
    if args.data is None and (args.forget_data is None or args.retain_data is None):
        parser.error("compare --model needs --data (split by the concept) or both --forget-data and --retain-data")
    task = ModelTask(args.model, args.concept, args.class_names, pretrained=args.pretrained,
                     aliases=tuple(args.alias), data=args.data, forget_data=args.forget_data,
                     retain_data=args.retain_data, eval_data=args.eval_data, utility_data=args.utility_data,
                     utility_classes=args.utility_classes, utility_templates=args.utility_templates,
                     utility_per_class=args.utility_per_class, k=args.top_k, batch_size=args.batch_size,
                     limit=args.limit, device=args.device, memory_budget=args.memory_budget,
                     max_evals=args.max_evals)
    return run_compare_model(task, args.out, methods=methods, progress=progress)


def _budget(text: str):
    from .memory import parse_budget

    try:
        return parse_budget(text)
    except SlugError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# exit codes (README "Command line")
EXIT_OK, EXIT_BAD_INPUT, EXIT_NOT_REACHED, EXIT_INTERRUPTED = 0, 2, 3, 130


def _one_line(err: BaseException) -> str:
    """A SlugError's message; an OS error as its file and reason; a text that is not UTF-8 as such."""
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text (byte {err.start}: {err.reason})"
    if isinstance(err, OSError) and not isinstance(err, SlugError):
        where = f" {err.filename}" if err.filename else ""
        return f"cannot write or read{where}: {err.strerror or err}"
    return " ".join(str(err).split("\n"))


INTERRUPTED = "slug-fast: interrupted (outputs are written whole or not at all)"


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:  # outputs are swapped in whole or not at all, so none is half-written
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED


def exit_if_interrupted_while_starting() -> None:
    """Called when Ctrl-C lands while `import slug_fast` runs: if that import is the command
    line starting (`slug-fast ...` or `python -m slug_fast ...`), say so in one line and exit 130."""
    argv = list(getattr(sys, "orig_argv", []))[1:]
    while argv and argv[0].startswith("-") and argv[0] != "-m":
        argv = argv[2:] if argv[0] in ("-X", "-W") else argv[1:]  # interpreter options
    command_line = (argv[:2] == ["-m", "slug_fast"] or argv[:2] == ["-m", "slug_fast.cli"]
                    or bool(argv) and os.path.basename(argv[0]) == "slug-fast")
    if command_line:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .distributed import launched

    if launched() and args.command != "unlearn":
        parser.error(f"only `unlearn` runs on several processes; run `slug-fast {args.command}` without torchrun")
    concepts = _unlearn_concepts(parser, args) if args.command == "unlearn" else {}
    ranks = None
    try:
        if args.command == "backends":
            from ._backends import availability
            out = {name: {"available": reason is None, "reason": reason} for name, reason in availability().items()}
        elif args.command == "unlearn" and len(concepts) > 1:
            from .job import run_unlearn_many
            out = run_unlearn_many(args.model, concepts, args.data, args.out, pretrained=args.pretrained,
                                   eval_data=args.eval_data, class_names=args.class_names, k=args.top_k,
                                   order=args.order or "given", share_layers=args.share_layers,
                                   strategy=args.strategy, tower=args.tower, max_evals=args.max_evals,
                                   batch_size=args.batch_size, limit=args.limit, device=args.device,
                                   checkpointing=args.checkpointing, progress=False if args.quiet else None)
        elif args.command == "unlearn":
            from .distributed import init_from_env
            from .job import run_unlearn
            ranks = init_from_env(args.device, args.timeout)
            (concept, aliases), = concepts.items()
            out = run_unlearn(args.model, concept, args.out, pretrained=args.pretrained, data=args.data,
                              forget_data=args.forget_data, retain_data=args.retain_data, eval_data=args.eval_data,
                              class_names=args.class_names, aliases=aliases, k=args.top_k,
                              strategy=args.strategy, tower=args.tower, max_evals=args.max_evals,
                              batch_size=args.batch_size, limit=args.limit, device=args.device,
                              memory_budget=args.memory_budget, checkpointing=args.checkpointing,
                              progress=False if args.quiet else None, ranks=ranks)
            if ranks is not None:
                import torch.distributed as dist

                # no rank leaves the group while rank 0 still writes: a gloo rank that tears its
                # group down first can abort at exit ("terminate called without an active exception")
                dist.barrier()
        elif args.command == "eval":
            from .job import run_eval
            out = run_eval(args.model, args.concept, args.out, pretrained=args.pretrained, delta=args.delta,
                           verify_base=not args.no_verify_base, class_names=args.class_names,
                           eval_data=args.eval_data, data=args.data, forget_data=args.forget_data,
                           aliases=tuple(args.alias), utility_data=args.utility_data,
                           utility_classes=args.utility_classes, utility_templates=args.utility_templates,
                           utility_per_class=args.utility_per_class, k=args.top_k, limit=args.limit,
                           device=args.device)
        elif args.command == "compare":
            from .compare import run_compare
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            rows = _compare(parser, args, methods)
            out = rows
        elif args.command == "apply":
            from .job import run_apply
            out = run_apply(args.model, args.delta, args.out, pretrained=args.pretrained, device=args.device,
                            verify_base=not args.no_verify_base)
        elif args.command == "revert":
            from .job import run_revert
            out = run_revert(args.model, args.delta, args.out, pretrained=args.pretrained, device=args.device)
        else:
            from .demo import concept_labels, run_demo, run_demo_many
            several = len(concept_labels(args.forget)) > 1  # refuse a bad digit before training anything
            demo = run_demo_many if several else run_demo
            out = demo(args.forget, args.out, epochs=args.epochs, seed=args.seed, strategy=args.strategy,
                       max_evals=args.max_evals, progress=False if args.quiet else None)
            if not args.quiet:
                print(_many_before_after(out) if several else _before_after(out), file=sys.stderr)
    except CriterionNotReached as err:  # an outcome, not bad input
        if ranks is None or ranks.rank == 0:
            print(f"slug-fast: criterion not reached: {err}", file=sys.stderr)
        return EXIT_NOT_REACHED
    except (SlugError, OSError, UnicodeDecodeError) as err:
        if ranks is None or ranks.rank == 0:  # every rank raised; rank 0 says why, once
            print(f"slug-fast: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if ranks is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if ranks is not None and ranks.rank != 0:
        return 0
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
