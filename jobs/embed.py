"""Write user and item embedding tables (Contract 4) from a published model, on Ray Data.

Runs the user tower over the users table and the item tower over the whole catalog (items no
one clicked included, embedded from their features) of the model's dataset, streaming through
one actor pool for both sides that loads the checkpoint once per actor. Writes users/ and items/ Parquet
(id, embedding: fixed_size_list<float32>[dim]) and manifest.json (dim, similarity, normalised,
ANN metric, counts, model, dataset, created_at). Before publishing it checks every file's
schema and that each side has exactly one row per source row (values were checked for NaN/Inf
in the actors); then the directory is moved into place with _SUCCESS last. A failure leaves no
visible output, and rerunning the command is safe.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any

from jobs.config_io import add_config_arguments, load_config
from pipelines import io
from pipelines.checkpoint import CHECKPOINT_DIR, DATASET_REF_FILE, load_config_of
from pipelines.embed import (
    MANIFEST_FILE,
    SIDES,
    EmbedBatch,
    build_manifest,
    check_pool_fits,
    check_side,
    embed_with_ray,
    source_id_type,
)
from twotower_core.config import Config, config_from_dict, config_to_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    out: str
    manifest: dict[str, Any]
    seconds: dict[str, float]


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
    parser.add_argument(
        "--use-gpu", action="store_true", help="one GPU per inference actor (embed.use_gpu)"
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing embedding dir"
    )


def check_inputs(model: str, dataset: str | None) -> tuple[str, dict[str, str]]:
    """(dataset dir, {side: entity table}); fails before Ray starts."""
    if not io.is_complete(model):
        raise FileNotFoundError(f"--model {model}: not a published model dir (no _SUCCESS)")
    dataset = dataset or io.read_json(io.join(model, CHECKPOINT_DIR, DATASET_REF_FILE))["dataset"]
    sources = {side: io.join(dataset, "features", f"{side}.parquet") for side in SIDES}
    for side, path in sources.items():
        if not io.exists(path):
            raise FileNotFoundError(f"{side} table {path} not found (is {dataset} a dataset dir?)")
    return str(dataset), sources


def run(
    *,
    model: str,
    out: str,
    config: Config | None = None,
    dataset: str | None = None,
    address: str | None = None,
    overwrite: bool = False,
    embed_class: type[EmbedBatch] = EmbedBatch,
) -> EmbedResult:
    """Embed both sides and publish. ``config`` supplies ``embed.*`` (default: the model's).

    ``embed_class`` is the per-batch transform run on the actors (tests inject failures).
    """
    model, out, dataset = io.absolute(model), io.absolute(out), io.absolute(dataset)
    dataset, sources = check_inputs(model, dataset)
    io.check_writable(out, overwrite=overwrite)
    model_config = load_config_of(model)
    settings = (config or model_config).embed
    id_types = {side: source_id_type(path, side) for side, path in sources.items()}

    import ray

    from jobs.ray_runtime import ensure_ray

    ensure_ray(address)
    resources = ray.cluster_resources()
    check_pool_fits(
        concurrency=settings.concurrency,
        cpus_per_actor=settings.cpus_per_actor,
        cluster_cpus=resources.get("CPU", 0.0),
        use_gpu=settings.use_gpu,
        cluster_gpus=resources.get("GPU", 0.0),
    )
    seconds: dict[str, float] = {}
    with io.staged_output(out, overwrite=overwrite) as staging:
        expected = {side: io.count_rows(source) for side, source in sources.items()}
        logger.info(
            "embedding %s with %d actor(s)",
            " and ".join(f"{rows} {side}" for side, rows in expected.items()),
            settings.concurrency,
        )
        started = time.perf_counter()
        embed_with_ray(
            sources,
            {side: io.join(staging, side) for side in sources},
            model_dir=model,
            batch_size=settings.batch_size,
            concurrency=settings.concurrency,
            cpus_per_actor=settings.cpus_per_actor,
            use_gpu=settings.use_gpu,
            embed_class=embed_class,
        )
        seconds["embed"] = time.perf_counter() - started
        counts = {
            side: check_side(
                io.join(staging, side),
                side=side,
                id_type=id_types[side],
                dim=model_config.model.output_dim,
                expected_rows=expected[side],
            )
            for side in sources
        }
        seconds["total"] = time.perf_counter() - started
        manifest = build_manifest(
            model_config, counts=counts, id_types=id_types, model=model, dataset=dataset
        )
        io.write_json(io.join(staging, MANIFEST_FILE), manifest)
    logger.info("embeddings written to %s", out)
    return EmbedResult(out=str(out), manifest=manifest, seconds=seconds)


def config_from_args(args: argparse.Namespace) -> Config | None:
    """--config, else the model's own config, with the flags and --set overrides on top."""
    # Flags are sugar for embed.* overrides, so they are validated like any other value.
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"embed.batch_size={args.batch_size}")
    if args.concurrency is not None:
        overrides.append(f"embed.concurrency={args.concurrency}")
    if args.use_gpu:
        overrides.append("embed.use_gpu=true")
    if args.config is not None:
        return load_config(args.config, overrides)
    if not overrides or not io.is_complete(args.model):
        return None  # run() names a missing model dir
    return config_from_dict(config_to_dict(load_config_of(args.model)), overrides=overrides)


def run_from_args(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = run(
        model=args.model,
        out=args.out,
        config=config,
        dataset=args.dataset,
        address=args.address,
        overwrite=args.overwrite,
    )
    manifest = result.manifest
    print(
        f"embeddings: {result.out} ({manifest['counts']['users']} users, "
        f"{manifest['counts']['items']} items, dim {manifest['dim']}, "
        f"{manifest['similarity']} -> {manifest['ann_metric']})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower embed", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
