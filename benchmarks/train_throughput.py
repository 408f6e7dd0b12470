"""Training throughput: the Ray Train job (1 and 2 workers) against a plain PyTorch loop.

All three train the same model with the same loss, data (the same columns: ``train_columns``)
and batch size through the same ``_train_step``; the plain loop reads the train rows into
memory with pyarrow, shuffles them each epoch (timed, as the job's shuffle is) and has no Ray,
no DDP and no data pipeline. Steady-state examples/s is the median over epochs after the first
(for the job, epochs read from the in-memory shard; see ``train.cache_shard_bytes``); startup
(Ray, worker group, first epoch's warm-up) is reported separately. Every
configuration runs once per round (--repeats rounds, interleaved); a ratio compares runs of the
same round, and the table gives the median over rounds and the range.

    python benchmarks/train_throughput.py                       # generates a world, builds it
    python benchmarks/train_throughput.py --dataset DIR --epochs 8
    python benchmarks/train_throughput.py --use-gpu             # on a GPU machine

Prints a table, writes benchmarks/results/train_throughput.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jobs.train import infer_specs
from pipelines import io
from pipelines.train_loop import (
    TowerPair,
    _optimizer,
    _train_step,
    batch_tensors,
    load_entity_tables,
    train_columns,
)
from twotower_core.config import Config, config_from_dict
from twotower_core.task import build_task
from twotower_core.towers import build_two_tower

RESULTS = Path(__file__).parent / "results"


def plain_loop(dataset: str, config: Config, *, epochs: int, device: torch.device) -> dict:
    """Single process, no Ray: examples/s per epoch."""
    torch.manual_seed(config.train.seed)
    torch.set_num_threads(config.train.torch_threads or 1)
    user_specs, item_specs = infer_specs(dataset, config)
    user_table, item_table, num_users, num_items, counts = load_entity_tables(
        dataset, user_specs, item_specs
    )
    model = build_two_tower(
        config.model,
        num_users=num_users,
        num_items=num_items,
        user_specs=user_specs,
        item_specs=item_specs,
    )
    pair = TowerPair(model.to(device), user_table.to(device), item_table.to(device))
    task = build_task(config.loss, item_counts=counts)
    optimizer = _optimizer(config, model.parameters())
    rows = io.read_table(io.join(dataset, "train"), columns=train_columns(config.loss))
    batch_size = config.train.batch_size
    generator = torch.Generator().manual_seed(0)
    rates = []
    for epoch in range(epochs):
        # The shuffle is part of an epoch's work, as the Ray job's shuffle buffer is of its.
        started, examples, loss_sum = time.perf_counter(), 0, 0.0
        shuffled = rows.take(np.random.default_rng(epoch).permutation(rows.num_rows))
        for start in range(0, rows.num_rows - batch_size + 1, batch_size):
            batch = shuffled.slice(start, batch_size)
            loss_sum = loss_sum + _train_step(
                pair, task, optimizer, batch_tensors(batch), config, generator, num_items, device
            )
            examples += batch.num_rows
        # As the job does at an epoch's end: reading the loss waits for the device's last step.
        float(loss_sum)
        rates.append(examples / (time.perf_counter() - started))
    return {"examples_per_s_by_epoch": rates}


def ray_job(dataset: str, config: Config, *, workers: int, threads: int, use_gpu: bool) -> dict:
    from jobs import train

    config = config_from_dict(
        {},
        overrides=[
            *_overrides(config),
            f"train.num_workers={workers}",
            f"train.cpus_per_worker={max(threads, 1) if not use_gpu else 1}",
            f"train.torch_threads={threads}",
            f"train.use_gpu={'true' if use_gpu else 'false'}",
        ],
    )
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        result = train.run(dataset=dataset, out=str(Path(scratch) / "model"), config=config)
        wall = time.perf_counter() - started
    rates = [row["examples_per_s"] for row in result.history]
    busy = sum(row["epoch_seconds"] for row in result.history)
    return {"examples_per_s_by_epoch": rates, "wall_s": wall, "outside_epochs_s": wall - busy}


def _overrides(config: Config) -> list[str]:
    t, m, loss = config.train, config.model, config.loss
    return [
        f"train.epochs={t.epochs}",
        f"train.batch_size={t.batch_size}",
        f"train.eval_max_users={t.eval_max_users}",
        f"model.embedding_dim={m.embedding_dim}",
        f"model.id_embedding_dim={m.id_embedding_dim}",
        f"model.hidden_dims=[{','.join(map(str, m.hidden_dims))}]",
        f"loss.name={loss.name}",
        f"loss.similarity={loss.similarity}",
    ]


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset", help="an existing dataset dir (default: generate and build one)"
    )
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument(
        "--epochs",
        type=int,
        default=8,
        help="epochs per run; steady state = the median of epochs 2..N (one epoch swings ±20%% here)",
    )
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads of the plain loop and the 1-worker job",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of all configurations (median kept)"
    )
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput"))
    args = parser.parse_args(argv)

    from jobs.ray_runtime import ensure_ray

    ensure_ray()
    scratch = tempfile.mkdtemp(prefix="twotower-bench-")
    dataset = args.dataset
    if dataset is None:
        from jobs import build_dataset
        from pipelines.synthetic import WorldSpec, generate_world

        logs = str(Path(scratch) / "logs")
        generate_world(WorldSpec(users=args.users, items=args.items, days=args.days, seed=0), logs)
        dataset = str(Path(scratch) / "dataset")
        build_dataset.run(logs=logs, out=dataset, config=config_from_dict({}))
    config = config_from_dict(
        {},
        overrides=[
            f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch_size}",
            f"train.torch_threads={args.threads}",
            "train.eval_max_users=500",
        ],
    )
    rows = io.count_rows(io.join(dataset, "train"))
    device = torch.device("cuda" if args.use_gpu else "cpu")
    runs = {"plain loop": lambda: plain_loop(dataset, config, epochs=args.epochs, device=device)}
    runs["ray, 1 worker"] = lambda: ray_job(
        dataset, config, workers=1, threads=args.threads, use_gpu=args.use_gpu
    )
    if not args.use_gpu or torch.cuda.device_count() >= 2:
        runs["ray, 2 workers"] = lambda: ray_job(
            dataset, config, workers=2, threads=max(args.threads // 2, 1), use_gpu=args.use_gpu
        )
    # Rounds run every configuration once, side by side; each ratio compares runs of the same
    # round (this machine is shared and its speed drifts), and the median over rounds is kept.
    rounds: list[dict[str, dict]] = []
    for number in range(args.repeats):
        current = {name: run() for name, run in runs.items()}
        baseline = steady(current["plain loop"]["examples_per_s_by_epoch"])
        for result in current.values():
            result["steady_examples_per_s"] = steady(result["examples_per_s_by_epoch"])
            result["ratio_to_plain"] = result["steady_examples_per_s"] / baseline
        rounds.append(current)
        print(
            f"round {number + 1}: "
            + "; ".join(
                f"{name} {r['steady_examples_per_s']:,.0f} ex/s ({r['ratio_to_plain']:.2f}x)"
                for name, r in current.items()
            ),
            flush=True,
        )
    results = {
        name: {
            "steady_examples_per_s": statistics.median(
                r[name]["steady_examples_per_s"] for r in rounds
            ),
            "ratio_to_plain": statistics.median(r[name]["ratio_to_plain"] for r in rounds),
            "ratio_runs": [r[name]["ratio_to_plain"] for r in rounds],
            "outside_epochs_s": (
                statistics.median(r[name]["outside_epochs_s"] for r in rounds)
                if "outside_epochs_s" in rounds[0][name]
                else None
            ),
        }
        for name in runs
    }

    print(
        f"\ntrain throughput: {rows:,} train rows, batch {args.batch_size}, {args.epochs} epochs, "
        f"device {device}, median of {args.repeats} round(s)"
    )
    print(f"{'run':<16}{'examples/s':>12}{'vs plain':>10}{'ratio range':>14}{'startup s':>11}")
    for name, result in results.items():
        low, high = min(result["ratio_runs"]), max(result["ratio_runs"])
        startup = result["outside_epochs_s"]
        print(
            f"{name:<16}{result['steady_examples_per_s']:>12,.0f}{result['ratio_to_plain']:>10.2f}"
            f"{f'{low:.2f}-{high:.2f}':>14}{'' if startup is None else f'{startup:>11.1f}'}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "rows": rows,
                "device": str(device),
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "results": results,
                "rounds": rounds,
            },
            indent=2,
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(results)
        ax.bar(
            names,
            [results[n]["steady_examples_per_s"] for n in names],
            color=["#888", "#3a7", "#37a"][: len(names)],
        )
        ax.set_ylabel("examples/s (steady state)")
        ax.set_title(f"train throughput, {device}, batch {args.batch_size}")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
