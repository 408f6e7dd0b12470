"""Build a training dataset (Contract 2) from raw interaction logs (Contract 1) on Ray Data:
positives (clicks, set A), exposed_not_clicked / ranked_out / unexposed negatives per positive,
a temporal eval split, vocab with click counts, features, quarantine/ and manifest.json.

The logs are validated from their Parquet footers before Ray starts; the output appears
atomically (staging dir, moved into place, _SUCCESS last). Window and seed flags override the
config's dataset section.
"""

from __future__ import annotations

import argparse
import logging

from jobs.config_io import add_config_arguments, load_config
from pipelines import io
from pipelines.build import BuildResult, build_dataset, check_inputs
from twotower_core.config import Config

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--logs", required=True, help="raw logs dir (Contract 1): one sub-dir per table"
    )
    parser.add_argument("--out", required=True, help="dataset dir to write (Contract 2)")
    add_config_arguments(parser)
    parser.add_argument(
        "--start", default=None, help="first day of the log window, YYYY-MM-DD (dataset.start)"
    )
    parser.add_argument(
        "--end",
        default=None,
        help="last day of the log window, YYYY-MM-DD (dataset.end; default: last day in the logs)",
    )
    parser.add_argument(
        "--window-days",
        type=int,
        default=None,
        help="window length in days ending at --end (dataset.window_days; default: all days)",
    )
    parser.add_argument(
        "--max-quarantine-fraction",
        type=float,
        default=None,
        help="fail when more than this fraction of input rows is quarantined "
        "(dataset.max_quarantine_fraction)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="negative sampling seed (dataset.seed)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset dir")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )


def run(
    *,
    logs: str,
    out: str,
    config: Config,
    address: str | None = None,
    overwrite: bool = False,
) -> BuildResult:
    """Validate, start or join Ray, build, publish."""
    logs, out = io.absolute(logs), io.absolute(out)
    check_inputs(logs, out, config.dataset, overwrite=overwrite)

    from jobs.ray_runtime import ensure_ray

    ensure_ray(address)
    return build_dataset(logs, out, config.dataset, overwrite=overwrite)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """Flags are sugar for ``dataset.*`` overrides, so they are validated like any other value."""
    overrides = list(args.overrides)
    for flag, key in (
        ("start", "start"),
        ("end", "end"),
        ("window_days", "window_days"),
        ("max_quarantine_fraction", "max_quarantine_fraction"),
        ("seed", "seed"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"dataset.{key}={value}")
    return overrides


def run_from_args(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides_from_args(args))
    result = run(
        logs=args.logs,
        out=args.out,
        config=config,
        address=args.address,
        overwrite=args.overwrite,
    )
    counts = result.manifest["counts"]
    print(
        f"dataset: {result.out} ({counts['train_positives']} train rows, "
        f"{counts['eval_positives']} eval rows, {counts['quarantined']} quarantined; "
        f"window {result.manifest['window']['start']}..{result.manifest['window']['end']}, "
        f"split {result.manifest['split_time']})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower build-dataset", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise SystemExit(main())
