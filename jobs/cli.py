"""The ``twotower`` command: one subcommand per job.

Each job module exposes ``add_arguments(parser)`` and ``run_from_args(args) -> int``; its
module docstring is the subcommand's description. Modules are imported lazily so that
``twotower --help`` stays fast and a subcommand only pays for what it uses.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from twotower_core.config import ConfigError

# subcommand -> (module, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate-logs": ("jobs.generate_logs", "write a synthetic world of raw logs (Contract 1)"),
    "build-dataset": (
        "jobs.build_dataset",
        "raw logs -> positives, negatives, eval split (Contract 2)",
    ),
    "train": ("jobs.train", "train the two towers on Ray Train (Contract 3)"),
    "embed": ("jobs.embed", "write user and item embedding tables (Contract 4)"),
    "evaluate": ("jobs.evaluate", "Recall/NDCG of a model or embedding dir on the eval split"),
    "retrieve": ("jobs.retrieve", "top-k items for a user from an embedding dir (FAISS)"),
    "nightly": (
        "jobs.nightly",
        "build -> train (warm start) -> evaluate -> gate -> embed -> publish",
    ),
    "demo": ("jobs.demo", "the whole pipeline on generated logs on a local Ray, with a summary"),
    "study": ("jobs.study", "which negatives, loss and similarity: a grid of runs and a report"),
}


def available_subcommands() -> dict[str, tuple[str, str]]:
    """Subcommands whose module exists in this checkout."""
    found = {}
    for name, (module, summary) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, summary)
    return found


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twotower",
        description="Train two-tower retrieval models from interaction logs on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in available_subcommands().items():
        if command is not None and name != command:
            # Only the chosen subcommand's module is imported; the others are listed by name.
            subparsers.add_parser(name, help=summary)
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._module.run_from_args(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as error:
        # User-facing problems (bad config, bad input, refused output): one clear line.
        print(f"twotower {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
