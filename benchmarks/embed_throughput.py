"""Embedding throughput: the Ray Data embed job against a plain single-process loop.

Both embed the same catalog (≥ 1M items by default) with the same randomly initialised model
dir (the default preset's towers) at the same batch size, through the same per-batch function
(``EmbedBatch``: id lookup, feature encoding, tower forward, NaN/Inf check). The plain loop
reads the Parquet file batch by batch with pyarrow, runs the tower in this process
(--plain-threads torch threads) and writes with a ``pyarrow.parquet.ParquetWriter``: no Ray. The
Ray side is the ``twotower embed`` job itself (``jobs.embed.run``: read → actor pool → write,
then the footer checks); its item side is timed.

Startup (Ray Data planning, actor start, loading the checkpoint in every actor) is measured
separately on a 4,096-row slice of the catalog; "steady" rows/s removes it from the full run.
Each configuration runs --repeats times and the median is kept.

    python benchmarks/embed_throughput.py                        # 1M items, concurrency 1 and 2
    python benchmarks/embed_throughput.py --items 200000 --repeats 1

Prints a table; writes benchmarks/results/embed_throughput.json (one entry per catalog size)
and embed_throughput_<items/1000>k.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines import io  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STARTUP_ROWS = 4096


def write_catalog(root: Path, *, num_items: int, num_users: int, seed: int) -> str:
    """A dataset-like dir with features/ and vocab/ for both sides (all the embed job reads)."""
    from pipelines.synthetic import make_ids

    rng = np.random.default_rng(seed)
    tag_names = np.array([f"tag{t:03d}" for t in range(500)])
    tag_counts = rng.integers(0, 5, num_items)
    offsets = np.concatenate([[0], np.cumsum(tag_counts)]).astype(np.int32)
    tag_values = pa.array(tag_names[rng.integers(0, 500, offsets[-1])])
    if isinstance(tag_values, pa.ChunkedArray):  # large catalogs convert in chunks
        tag_values = tag_values.combine_chunks()
    tags = pa.ListArray.from_arrays(pa.array(offsets), tag_values)
    items = pa.table(
        {
            "item_id": make_ids(num_items, kind="item", id_type="int"),
            "category": pa.array(np.array([f"cat{c:03d}" for c in range(200)])[
                rng.integers(0, 200, num_items)
            ]),
            "tags": tags,
            "price": pa.array(np.round(rng.lognormal(3.0, 0.8, num_items), 2)),
            "brand": pa.array(np.array([f"brand{b:05d}" for b in range(5000)])[
                rng.integers(0, 5000, num_items)
            ]),
        }
    )  # fmt: skip
    users = pa.table(
        {
            "user_id": make_ids(num_users, kind="user", id_type="int"),
            "country": pa.array(np.array(["de", "fr", "us", "jp"])[rng.integers(0, 4, num_users)]),
        }
    )
    dataset = root / "dataset"
    for side, table in (("items", items), ("users", users)):
        key = side[:-1]
        index = pa.array(np.arange(table.num_rows, dtype=np.int64))
        io.write_table(
            str(dataset / "features" / f"{side}.parquet"),
            table.add_column(0, f"{key}_idx", index),
        )
        vocab = pa.table(
            {
                f"{key}_id": table[f"{key}_id"],
                f"{key}_idx": index,
                "count": pa.array(rng.poisson(2.0, table.num_rows).astype(np.int64)),
            }
        )
        io.write_table(str(dataset / "vocab" / f"{side}.parquet"), vocab)
    return str(dataset)


def write_random_model(root: Path, dataset: str, *, seed: int):
    """A published model dir for ``dataset``: the default preset's towers, random weights."""
    import torch

    from jobs.config_io import load_config
    from jobs.train import infer_specs
    from pipelines.checkpoint import model_payload, write_model_dir
    from twotower_core.towers import build_two_tower

    config = load_config("default")
    user_specs, item_specs = infer_specs(dataset, config)
    num_users = io.count_rows(io.join(dataset, "vocab", "users.parquet"))
    num_items = io.count_rows(io.join(dataset, "vocab", "items.parquet"))
    torch.manual_seed(seed)
    model = build_two_tower(
        config.model,
        num_users=num_users,
        num_items=num_items,
        user_specs=user_specs,
        item_specs=item_specs,
    )
    payload = model_payload(
        model.state_dict(),
        config=config,
        user_specs=user_specs,
        item_specs=item_specs,
        num_users=num_users,
        num_items=num_items,
    )
    out = str(root / "model")
    with io.staged_output(out) as staging:
        write_model_dir(
            staging,
            payload=payload,
            config=config,
            dataset_dir=dataset,
            metrics={"best": {}, "epochs": []},
            train_log_csv="",
        )
    return out, config


def plain_loop(
    model: str, source: str, dest: str, *, batch_size: int, torch_threads: int
) -> dict[str, float]:
    """One process: pyarrow batches → EmbedBatch → ParquetWriter."""
    from pipelines.embed import PARQUET_WRITE_OPTIONS, EmbedBatch

    started = time.perf_counter()
    embed = EmbedBatch(model, "items", torch_threads=torch_threads)
    loaded = time.perf_counter()
    rows = 0
    with pq.ParquetFile(source) as reader:
        writer = None
        for batch in reader.iter_batches(batch_size=batch_size):
            out = embed(pa.Table.from_batches([batch]))
            if writer is None:
                writer = pq.ParquetWriter(dest, out.schema, **PARQUET_WRITE_OPTIONS)
            writer.write_table(out)
            rows += out.num_rows
        writer.close()
    finished = time.perf_counter()
    return {
        "rows": rows,
        "seconds": finished - started,
        "startup_seconds": loaded - started,
        "rows_per_s": rows / (finished - started),
        "steady_rows_per_s": rows / (finished - loaded),
    }


def ray_job(model: str, dataset: str, out: str, config, *, concurrency: int) -> float:
    """Seconds the embed job spent embedding and checking both sides (the user side is small)."""
    from jobs import embed
    from twotower_core.config import config_from_dict, config_to_dict

    settings = config_from_dict(
        config_to_dict(config), overrides=[f"embed.concurrency={concurrency}"]
    )
    result = embed.run(model=model, out=out, dataset=dataset, config=settings, overwrite=True)
    return result.seconds["total"]


def slice_dataset(dataset: str, root: Path, rows: int) -> str:
    """The first ``rows`` items of ``dataset`` (and all its users), for the startup runs."""
    small = root / "startup_dataset"
    for side in ("items", "users"):
        table = io.read_table(io.join(dataset, "features", f"{side}.parquet"))
        if side == "items":
            table = table.slice(0, rows)
        io.write_table(str(small / "features" / f"{side}.parquet"), table)
    return str(small)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="catalog size (default 1M)")
    parser.add_argument("--users", type=int, default=1000, help="users table size (default 1000)")
    parser.add_argument(
        "--batch-size", type=int, default=4096, help="rows per batch (default 4096)"
    )
    parser.add_argument(
        "--concurrency",
        default="1,2",
        help="comma-separated actor pool sizes to run, 1 CPU each (default 1,2)",
    )
    parser.add_argument(
        "--plain-threads",
        type=int,
        default=1,
        help="torch threads of the plain loop (default 1: on a small shared machine more "
        "threads than idle cores make OpenMP spin; the per-batch work is small)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="scratch dir (default: a temp dir); a catalog and model of the same size there are reused",
    )
    parser.add_argument("--seed", type=int, default=0, help="catalog and weight seed")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    root = Path(args.work_dir or tempfile.mkdtemp(prefix="embed_throughput_"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset, model = str(root / "dataset"), str(root / "model")
    reuse = (
        io.is_complete(model)
        and io.count_rows(io.join(dataset, "features", "items.parquet")) == args.items
    )
    if reuse:
        from pipelines.checkpoint import load_config_of

        config = load_config_of(model)
    else:
        if io.exists(model):
            io.remove(model)
        dataset = write_catalog(root, num_items=args.items, num_users=args.users, seed=args.seed)
        model, config = write_random_model(root, dataset, seed=args.seed)
    config_overrides = [f"embed.batch_size={args.batch_size}", "embed.cpus_per_actor=1"]
    from twotower_core.config import config_from_dict, config_to_dict

    config = config_from_dict(config_to_dict(config), overrides=config_overrides)
    print(
        f"catalog: {args.items:,} items, {args.users:,} users; model dim {config.model.embedding_dim} "
        f"(setup {time.perf_counter() - started:.0f} s, in {root})",
        flush=True,
    )
    source = io.join(dataset, "features", "items.parquet")

    from jobs.ray_runtime import ensure_ray

    init_started = time.perf_counter()
    ensure_ray(num_cpus=args.num_cpus)
    ray_init_seconds = time.perf_counter() - init_started
    small = slice_dataset(dataset, root, STARTUP_ROWS)
    startup = {
        c: statistics.median(
            ray_job(model, small, str(root / "ray_small"), config, concurrency=c)
            for _ in range(min(args.repeats, 2))
        )
        for c in concurrencies
    }
    # Rounds interleave the plain loop and the Ray runs, so that each ratio compares runs made
    # under the same background load (this machine is shared).
    plain_runs: list[dict[str, float]] = []
    ray_runs: dict[int, list[float]] = {c: [] for c in concurrencies}
    ratios: dict[int, list[float]] = {c: [] for c in concurrencies}
    for repeat in range(args.repeats):
        plain_runs.append(
            plain_loop(
                model,
                source,
                str(root / "plain.parquet"),
                batch_size=args.batch_size,
                torch_threads=args.plain_threads,
            )
        )
        report = [f"round {repeat + 1}: plain {plain_runs[-1]['rows_per_s']:,.0f} rows/s"]
        for c in concurrencies:
            seconds = ray_job(model, dataset, str(root / "ray_out"), config, concurrency=c)
            ray_runs[c].append(seconds)
            ratios[c].append(args.items / seconds / plain_runs[-1]["rows_per_s"])
            report.append(f"ray x{c} {args.items / seconds:,.0f} rows/s ({ratios[c][-1]:.2f}x)")
        print("; ".join(report) + f"; load {os.getloadavg()[0]:.1f}", flush=True)

    ray_results = {}
    for c in concurrencies:
        seconds = statistics.median(ray_runs[c])
        ray_results[c] = {
            "seconds_runs": ray_runs[c],
            "seconds": seconds,
            "startup_seconds": startup[c],
            "rows_per_s": args.items / seconds,
            "steady_rows_per_s": (args.items - STARTUP_ROWS) / max(seconds - startup[c], 1e-9),
            "ratio_runs": ratios[c],
            "ratio": statistics.median(ratios[c]),
        }

    agree = outputs_agree(str(root / "plain.parquet"), str(root / "ray_out" / "items"))
    plain = {
        key: statistics.median(run[key] for run in plain_runs)
        for key in ("seconds", "startup_seconds", "rows_per_s", "steady_rows_per_s")
    }
    plain["ratio"] = 1.0
    rows = [("plain loop", plain)] + [
        (f"ray, {c} actor(s)", result) for c, result in ray_results.items()
    ]
    print()
    print(
        f"embed throughput: {args.items:,} items, batch {args.batch_size}, median of {args.repeats}"
    )
    print(f"{'':<20}{'seconds':>9}{'startup s':>11}{'rows/s':>12}{'ratio':>8}{'steady rows/s':>15}")
    for name, result in rows:
        print(
            f"{name:<20}{result['seconds']:>9.1f}{result['startup_seconds']:>11.1f}"
            f"{result['rows_per_s']:>12,.0f}{result['ratio']:>7.2f}x"
            f"{result['steady_rows_per_s']:>15,.0f}"
        )
    print(
        "ratio = median over rounds of ray rows/s / plain rows/s in the same round; "
        f"ray.init took {ray_init_seconds:.1f} s (not counted)"
    )
    print(f"ray output equals the plain loop's on a sample of ids: {agree}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "items": args.items,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "plain_threads": args.plain_threads,
        "load_average": os.getloadavg(),
        "plain_loop": {**plain, "runs": plain_runs},
        "ray": {str(c): result for c, result in ray_results.items()},
        "outputs_agree": agree,
        "ray_init_seconds": ray_init_seconds,
    }
    # One entry per catalog size, so runs at several sizes are kept side by side.
    path = RESULTS / "embed_throughput.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    by_size = previous.get("by_items", {})
    by_size[str(args.items)] = summary
    path.write_text(json.dumps({"by_items": by_size}, indent=2, sort_keys=True) + "\n")
    figure = RESULTS / f"embed_throughput_{args.items // 1000}k.png"
    plot(rows, figure, items=args.items)
    print(f"wrote {path} (entry {args.items}) and {figure}")
    return 0


def outputs_agree(plain_path: str, ray_path: str, sample: int = 2000) -> bool:
    plain = pq.read_table(plain_path)
    ray_table = pq.read_table(ray_path)
    picks = pa.array(np.random.default_rng(0).choice(plain.num_rows, sample, replace=False))
    ids = plain["item_id"].take(picks)
    ray_rows = pa.compute.index_in(ids, value_set=ray_table["item_id"])
    if ray_rows.null_count:
        return False
    dim = plain.schema.field("embedding").type.list_size
    a = plain["embedding"].take(picks).combine_chunks().flatten().to_numpy().reshape(-1, dim)
    b = ray_table["embedding"].take(ray_rows).combine_chunks().flatten().to_numpy()
    return bool(np.allclose(a, b.reshape(-1, dim), atol=1e-5))


def plot(rows, path: Path, *, items: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in rows]
    total = [result["rows_per_s"] for _, result in rows]
    steady = [result["steady_rows_per_s"] for _, result in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, total, width=0.4, label="end to end")
    ax.bar(x + 0.2, steady, width=0.4, label="steady (startup removed)")
    for position, value, (_, result) in zip(x - 0.2, total, rows):
        ax.text(position, value, f"{result['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("items embedded per second")
    ax.set_title(f"embed throughput, {items:,} items ({os.cpu_count()} cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
