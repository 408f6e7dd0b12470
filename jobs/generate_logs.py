"""Generate a synthetic world of raw logs (Contract 1) with planted user and item vectors.

Writes OUT/{clicks,impressions,retrievals}/date=YYYY-MM-DD/part-0.parquet, OUT/items/,
OUT/users/ and the planted truth in OUT/_oracle/ (see pipelines.synthetic), through a staging
directory so that a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from pipelines import io
from pipelines.synthetic import ID_TYPES, WorldSpec, generate_world


@dataclass(frozen=True)
class GenerateLogsResult:
    out: str
    rows: dict[str, int]
    dates: list[str]
    seconds: float
    ctr: float
    clicks_per_user: float
    clicks_per_active_user_day: float
    clicks_per_position: list[int]

    def summary(self) -> str:
        lines = [f"wrote {self.out} ({self.dates[0]} .. {self.dates[-1]}) in {self.seconds:.1f}s"]
        lines += [f"  {table:<12}{count:>12,d} rows" for table, count in self.rows.items()]
        lines.append(
            f"  CTR {self.ctr:.3f}; clicks per user {self.clicks_per_user:.1f}, "
            f"per active user-day {self.clicks_per_active_user_day:.2f}"
        )
        lines.append("  clicks by position: " + " ".join(str(c) for c in self.clicks_per_position))
        return "\n".join(lines)


def run(
    spec: WorldSpec, out: str, *, overwrite: bool = False, progress: bool = False
) -> GenerateLogsResult:
    """Validate, refuse an existing non-empty ``out`` unless overwrite, generate, publish."""
    spec.validate()
    with io.staged_output(out, overwrite=overwrite) as staging:
        world = generate_world(spec, staging, progress=progress)
    return GenerateLogsResult(
        out=out,
        rows=world.rows,
        dates=world.dates,
        seconds=world.seconds,
        ctr=world.ctr,
        clicks_per_user=world.clicks_per_user,
        clicks_per_active_user_day=world.clicks_per_active_user_day,
        clicks_per_position=world.clicks_per_position,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = WorldSpec()
    parser.add_argument("out", metavar="OUT", help="output directory (local path or URI)")
    parser.add_argument("--users", type=int, default=defaults.users, help="number of users")
    parser.add_argument("--items", type=int, default=defaults.items, help="catalog size")
    parser.add_argument("--days", type=int, default=defaults.days, help="days of logs")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    parser.add_argument(
        "--id-type",
        choices=ID_TYPES,
        default=defaults.id_type,
        help="int64 ids, or string ids like u000123 / i000045",
    )
    parser.add_argument(
        "--start-date", default=defaults.start_date, help="first day of logs (YYYY-MM-DD)"
    )
    parser.add_argument(
        "--requests-per-user-per-day",
        type=float,
        default=defaults.requests_per_user_per_day,
        help="mean requests per user per day (Poisson, with per-user activity)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=defaults.candidates_per_request,
        help="R: candidates the retrieval stage returns per request",
    )
    parser.add_argument(
        "--shown",
        type=int,
        default=defaults.shown_per_request,
        help="S: items the ranker shows per request (positions 0..S-1)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")


def spec_from_args(args: argparse.Namespace) -> WorldSpec:
    return WorldSpec(
        users=args.users,
        items=args.items,
        days=args.days,
        seed=args.seed,
        id_type=args.id_type,
        start_date=args.start_date,
        requests_per_user_per_day=args.requests_per_user_per_day,
        candidates_per_request=args.candidates,
        shown_per_request=args.shown,
    )


def run_from_args(args: argparse.Namespace) -> int:
    try:
        result = run(spec_from_args(args), args.out, overwrite=args.overwrite, progress=True)
    except (ValueError, io.OutputExistsError) as error:
        print(f"generate-logs: error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower generate-logs", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
