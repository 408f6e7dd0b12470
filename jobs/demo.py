"""Run the whole pipeline on generated logs on a local Ray and print one summary table:
generate-logs -> build-dataset -> train (2 workers, DDP over gloo) -> embed -> evaluate,
with rows per negative source and Recall@50 of the model next to MostPop and the planted
oracle. Everything is written under --out (replaced on every run).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.config_io import add_config_arguments, load_config
from pipelines import io
from twotower_core.config import Config


@dataclass
class DemoResult:
    out: str
    paths: dict[str, str]
    negatives_by_source: dict[str, int]
    train_positives: int
    eval_positives: int
    recall_at_50: dict[str, float]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="demo-output", help="where everything is written (default demo-output)"
    )
    parser.add_argument("--users", type=int, default=2000, help="synthetic users (default 2000)")
    parser.add_argument(
        "--items", type=int, default=1000, help="synthetic catalog size (default 1000)"
    )
    parser.add_argument(
        "--days", type=int, default=7, help="days of logs; the last is the eval day (default 7)"
    )
    parser.add_argument("--seed", type=int, default=0, help="world and sampling seed (default 0)")
    add_config_arguments(parser)
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: a local Ray)"
    )


def oracle_vectors(logs: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Planted user/item vectors in dataset index order, shaped so that dot = true affinity.

    Affinity is u·v + b_item, so users get a trailing 1 and items their bias: ``[U, L+1]``, ``[I, L+1]``.
    """
    import polars as pl

    from pipelines.synthetic import load_oracle

    oracle = load_oracle(logs)
    user_vocab = pl.from_arrow(
        io.read_table(io.join(dataset, "vocab", "users.parquet"), columns=["user_id", "user_idx"])
    )
    item_vocab = pl.from_arrow(
        io.read_table(io.join(dataset, "vocab", "items.parquet"), columns=["item_id", "item_idx"])
    )
    user_rows = (
        user_vocab.join(
            pl.DataFrame({"user_id": oracle.user_ids}).with_row_index("row"),
            on="user_id",
            how="left",
        )
        .sort("user_idx")["row"]
        .to_numpy()
    )
    item_rows = (
        item_vocab.join(
            pl.DataFrame({"item_id": oracle.item_ids}).with_row_index("row"),
            on="item_id",
            how="left",
        )
        .sort("item_idx")["row"]
        .to_numpy()
    )
    users = np.hstack([oracle.user_vectors[user_rows], np.ones((len(user_rows), 1))])
    items = np.hstack([oracle.item_vectors[item_rows], oracle.item_bias[item_rows][:, None]])
    return users.astype(np.float32), items.astype(np.float32)


def run(
    *,
    out: str,
    config: Config,
    users: int,
    items: int,
    days: int,
    seed: int,
    address: str | None = None,
) -> DemoResult:
    from jobs import build_dataset, embed, train
    from jobs.ray_runtime import ensure_ray
    from pipelines.evaluation import evaluate_embeddings, evaluate_popularity, evaluate_vectors
    from pipelines.synthetic import WorldSpec, generate_world

    paths = {name: io.join(out, name) for name in ("logs", "dataset", "model", "embeddings")}
    seconds: dict[str, float] = {}
    if io.exists(out):
        io.remove(out)
    io.makedirs(out)

    started = time.perf_counter()
    generate_world(WorldSpec(users=users, items=items, days=days, seed=seed), paths["logs"])
    seconds["generate-logs"] = time.perf_counter() - started

    ensure_ray(address)
    started = time.perf_counter()
    built = build_dataset.run(logs=paths["logs"], out=paths["dataset"], config=config)
    seconds["build-dataset"] = time.perf_counter() - started

    started = time.perf_counter()
    train.run(dataset=paths["dataset"], out=paths["model"], config=config)
    seconds["train"] = time.perf_counter() - started

    started = time.perf_counter()
    embed.run(model=paths["model"], out=paths["embeddings"])
    seconds["embed"] = time.perf_counter() - started

    started = time.perf_counter()
    ks = config.train.eval_ks
    metrics = {
        "two-tower": evaluate_embeddings(paths["embeddings"], paths["dataset"], ks=ks),
        "popularity": evaluate_popularity(paths["dataset"], ks=ks),
    }
    oracle_users, oracle_items = oracle_vectors(paths["logs"], paths["dataset"])
    metrics["oracle"] = evaluate_vectors(
        oracle_users, oracle_items, paths["dataset"], similarity="dot", ks=ks
    )
    seconds["evaluate"] = time.perf_counter() - started

    counts: dict[str, Any] = built.manifest["counts"]
    return DemoResult(
        out=str(out),
        paths=paths,
        negatives_by_source=dict(counts["negatives_by_source"]),
        train_positives=int(counts["train_positives"]),
        eval_positives=int(counts["eval_positives"]),
        recall_at_50={name: m["recall@50"] for name, m in metrics.items()},
        metrics=metrics,
        seconds=seconds,
    )


def summary_table(result: DemoResult) -> str:
    lines = ["", "twotower demo", "=" * 60, "training rows"]
    lines.append(f"  {'positives (train)':<34}{result.train_positives:>10,}")
    lines.append(f"  {'positives (eval day)':<34}{result.eval_positives:>10,}")
    for source, count in result.negatives_by_source.items():
        lines.append(f"  {'negatives: ' + source:<34}{count:>10,}")
    lines.append("eval day, full catalog, train items excluded")
    lines.append(f"  {'':<14}{'Recall@50':>11}{'NDCG@10':>10}{'Recall@10':>11}")
    for name, m in result.metrics.items():
        lines.append(
            f"  {name:<14}{m['recall@50']:>11.4f}{m['ndcg@10']:>10.4f}{m['recall@10']:>11.4f}"
        )
    lines.append("outputs")
    for name, path in result.paths.items():
        lines.append(f"  {name:<14}{path}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()))
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    result = run(
        out=args.out,
        config=config,
        users=args.users,
        items=args.items,
        days=args.days,
        seed=args.seed,
        address=args.address,
    )
    print(summary_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower demo", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
