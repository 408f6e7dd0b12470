"""Write user and item embedding tables (Contract 4) from a published model, on Ray Data.

Runs the user tower over the users table and the item tower over the whole catalog (cold
items included) of the model's dataset, on an actor pool that loads the checkpoint once per
actor. Writes users/ and items/ Parquet (id, embedding: fixed_size_list<float32>[dim]) and
manifest.json (dim, similarity, normalised, ANN metric, counts, model, dataset), checks row
counts against the source tables, then publishes atomically with _SUCCESS last.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

from jobs.config_io import add_config_arguments, load_config
from pipelines import io
from pipelines.checkpoint import CHECKPOINT_DIR, DATASET_REF_FILE, load_config_of
from twotower_core.config import Config

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class EmbedResult:
    out: str
    manifest: dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="published model dir (Contract 3)")
    parser.add_argument("--out", required=True, help="embedding dir to write (Contract 4)")
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset dir whose features/ tables to embed (default: the model's own dataset)",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per inference batch (embed.batch_size)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="inference actors (embed.concurrency)"
    )
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per inference actor")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing embedding dir"
    )


def run(
    *,
    model: str,
    out: str,
    config: Config | None = None,
    dataset: str | None = None,
    address: str | None = None,
    overwrite: bool = False,
) -> EmbedResult:
    from twotower_core.similarity import ann_metric, normalize_for_serving

    if not io.is_complete(model):
        raise FileNotFoundError(f"--model {model}: not a published model dir (no _SUCCESS)")
    io.check_writable(out, overwrite=overwrite)
    model_config = load_config_of(model)
    embed_config = (config or model_config).embed
    dataset = dataset or io.read_json(io.join(model, CHECKPOINT_DIR, DATASET_REF_FILE))["dataset"]
    sources = {side: io.join(dataset, "features", f"{side}.parquet") for side in ("users", "items")}
    for side, path in sources.items():
        if not io.exists(path):
            raise FileNotFoundError(f"{side} table {path} not found (is {dataset} a dataset dir?)")

    import ray.data

    from jobs.ray_runtime import ensure_ray
    from pipelines.embed import EmbedBatch

    ensure_ray(address)
    counts: dict[str, int] = {}
    with io.staged_output(out, overwrite=overwrite) as staging:
        for side, source in sources.items():
            expected = io.count_rows(source)
            logger.info("embedding %d %s", expected, side)
            (
                ray.data.read_parquet(source)
                .map_batches(
                    EmbedBatch,
                    fn_constructor_args=(str(model), side),
                    batch_format="pyarrow",
                    batch_size=embed_config.batch_size,
                    concurrency=embed_config.concurrency,
                    num_cpus=embed_config.cpus_per_actor,
                    num_gpus=1 if embed_config.use_gpu else 0,
                )
                .write_parquet(io.join(staging, side))
            )
            written = io.count_rows(io.join(staging, side)) if expected else 0
            if written != expected:
                raise RuntimeError(f"{side}: wrote {written} embeddings for {expected} rows")
            counts[side] = written
        similarity = model_config.loss.similarity
        manifest = {
            "dim": model_config.model.embedding_dim,
            "similarity": similarity,
            "normalized": bool(normalize_for_serving(similarity) or model_config.model.normalize),
            "ann_metric": ann_metric(similarity),
            "counts": counts,
            "model": str(model),
            "dataset": str(dataset),
            "created_at": io.utc_now(),
        }
        io.write_json(io.join(staging, MANIFEST_FILE), manifest)
    logger.info("embeddings written to %s", out)
    return EmbedResult(out=str(out), manifest=manifest)


def run_from_args(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"embed.batch_size={args.batch_size}")
    if args.concurrency is not None:
        overrides.append(f"embed.concurrency={args.concurrency}")
    if args.use_gpu:
        overrides.append("embed.use_gpu=true")
    config = load_config(args.config, overrides) if (args.config or overrides) else None
    result = run(
        model=args.model,
        out=args.out,
        config=config,
        dataset=args.dataset,
        address=args.address,
        overwrite=args.overwrite,
    )
    counts = result.manifest["counts"]
    print(
        f"embeddings: {result.out} ({counts['users']} users, {counts['items']} items, dim {result.manifest['dim']})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower embed", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
