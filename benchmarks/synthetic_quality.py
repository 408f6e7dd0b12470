"""Quality on the synthetic world: Recall@50 of the two-tower model against the planted oracle.

For each seed: generate the demo world (2000 users, 1000 items, 7 days), build the dataset
(Contract 2), train with the given config (default: the shipped ``default`` preset) on Ray
Train with 2 workers, then score the eval day over the full catalog with train items
excluded, next to MostPop and the oracle (ranking by the planted true affinity). The target
of issue 5 is two-tower Recall@50 >= 0.8 x the oracle's.

The published model is the best epoch by ``train.early_stopping_metric`` on the eval day,
as the training job does; the synthetic world has no separate validation day.

    python -m benchmarks.synthetic_quality                      # default config, seeds 0 1 2
    python -m benchmarks.synthetic_quality --set train.epochs=10 --seeds 0

Prints a table (mean ± std over seeds), writes benchmarks/results/synthetic_quality.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.config_io import add_config_arguments, load_config
from twotower_core.config import Config, config_from_dict, config_to_dict

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO = 0.8
MODELS: tuple[str, ...] = ("two-tower", "popularity", "oracle")
REPORTED_METRICS: tuple[str, ...] = ("recall@50", "recall@10", "ndcg@10")


def run_seed(
    seed: int, config: Config, *, scratch: str, users: int, items: int, days: int
) -> dict[str, Any]:
    """One world: generate → build → train → score the eval day. Returns metrics per model."""
    from benchmarks.movielens import model_vectors
    from jobs import build_dataset, train
    from jobs.demo import oracle_vectors
    from pipelines import io
    from pipelines.checkpoint import load_model
    from pipelines.evaluation import evaluate_popularity, evaluate_vectors
    from pipelines.synthetic import WorldSpec, generate_world

    root = Path(scratch) / f"seed{seed}"
    logs, dataset, model = (str(root / name) for name in ("logs", "dataset", "model"))
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    generate_world(WorldSpec(users=users, items=items, days=days, seed=seed), logs)
    built = build_dataset.run(logs=logs, out=dataset, config=config, overwrite=True)
    seconds["generate+build"] = time.perf_counter() - started

    started = time.perf_counter()
    trained = train.run(dataset=dataset, out=model, config=config, overwrite=True)
    seconds["train"] = time.perf_counter() - started

    ks = tuple(sorted({10, 50, *config.train.eval_ks}))
    user_UD, item_ID = model_vectors(load_model(model), dataset)
    metrics = {
        "two-tower": evaluate_vectors(
            user_UD, item_ID, dataset, similarity=config.loss.similarity, ks=ks
        ),
        "popularity": evaluate_popularity(dataset, ks=ks),
    }
    oracle_users, oracle_items = oracle_vectors(logs, dataset)
    metrics["oracle"] = evaluate_vectors(
        oracle_users, oracle_items, dataset, similarity="dot", ks=ks
    )
    counts = built.manifest["counts"]
    io.remove(str(root))
    return {
        "seed": seed,
        "metrics": metrics,
        "ratio_to_oracle": metrics["two-tower"]["recall@50"] / metrics["oracle"]["recall@50"],
        "best_epoch": trained.best_epoch,
        "history": trained.history,
        "train_positives": counts["train_positives"],
        "eval_positives": counts["eval_positives"],
        "seconds": seconds,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for model in MODELS:
        summary[model] = {
            metric: mean_std([run["metrics"][model][metric] for run in runs])
            for metric in REPORTED_METRICS
        }
    summary["ratio_to_oracle"] = mean_std([run["ratio_to_oracle"] for run in runs])
    return summary


def table(summary: dict[str, Any], *, num_seeds: int) -> str:
    lines = [
        f"synthetic world, eval day, full catalog, train items excluded (mean ± std over {num_seeds} seeds)",
        f"{'model':<12}" + "".join(f"{metric:>20}" for metric in REPORTED_METRICS),
    ]
    for model in MODELS:
        cells = "".join(f"{f'{mean:.4f} ± {std:.4f}':>20}" for mean, std in summary[model].values())
        lines.append(f"{model:<12}{cells}")
    ratio, ratio_std = summary["ratio_to_oracle"]
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    lines.append(
        f"two-tower Recall@50 / oracle = {ratio:.3f} ± {ratio_std:.3f} "
        f"({verdict} the {TARGET_RATIO} target)"
    )
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    means = [summary[model]["recall@50"][0] for model in MODELS]
    stds = [summary[model]["recall@50"][1] for model in MODELS]
    left.bar(MODELS, means, yerr=stds, color=["tab:blue", "tab:gray", "tab:green"], capsize=4)
    oracle = summary["oracle"]["recall@50"][0]
    left.axhline(TARGET_RATIO * oracle, color="tab:red", linestyle="--", label="0.8 × oracle")
    left.set_ylabel("Recall@50 (eval day)")
    left.legend()
    for run in runs:
        epochs = [row["epoch"] for row in run["history"]]
        right.plot(epochs, [row["recall@50"] for row in run["history"]], marker="o",
                   label=f"seed {run['seed']}")  # fmt: skip
    right.axhline(TARGET_RATIO * oracle, color="tab:red", linestyle="--")
    right.set_xlabel("epoch")
    right.set_ylabel("Recall@50 (eval day)")
    right.legend()
    fig.suptitle("two-tower on the synthetic world vs the planted oracle")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="world and train seeds"
    )
    parser.add_argument("--users", type=int, default=2000, help="synthetic users (default 2000)")
    parser.add_argument("--items", type=int, default=1000, help="catalog size (default 1000)")
    parser.add_argument("--days", type=int, default=7, help="days; the last is eval (default 7)")
    parser.add_argument(
        "--out",
        default=str(RESULTS / "synthetic_quality"),
        help="results path without suffix (.json and .png are written)",
    )
    args = parser.parse_args(argv)
    base = load_config(args.config or "default", args.overrides)

    from benchmarks.movielens import start_ray

    start_ray()
    scratch = tempfile.mkdtemp(prefix="twotower-synthetic-")
    runs = []
    try:
        for seed in args.seeds:
            seeded = config_to_dict(base)
            seeded["train"]["seed"] = seed
            seeded["dataset"]["seed"] = seed
            runs.append(
                run_seed(
                    seed,
                    config_from_dict(seeded),
                    scratch=scratch,
                    users=args.users,
                    items=args.items,
                    days=args.days,
                )
            )
            print(
                f"seed {seed}: two-tower recall@50 {runs[-1]['metrics']['two-tower']['recall@50']:.4f}, "
                f"oracle {runs[-1]['metrics']['oracle']['recall@50']:.4f}, "
                f"ratio {runs[-1]['ratio_to_oracle']:.3f}",
                flush=True,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = summarize(runs)
    print()
    print(table(summary, num_seeds=len(runs)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "config": config_to_dict(base),
                "config_source": args.config or "default",
                "overrides": list(args.overrides),
                "world": {"users": args.users, "items": args.items, "days": args.days},
                "target_ratio": TARGET_RATIO,
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    plot(runs, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
