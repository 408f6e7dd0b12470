"""Score an embedding dir, a model, or a baseline on a dataset's eval split: Recall@K,
HitRate@K, NDCG@K, MRR and coverage over the full catalog, excluding each user's train
positives. Prints the metrics and writes a JSON report (--report).

With --embeddings the numbers come from the published tables alone. Cut-offs and eval users
default to the ones the model was trained with (train.eval_ks, eval_max_users, seed), and the
report puts the metrics the training job logged for that checkpoint (metrics.json "best") next
to them: on the model's own dataset they agree up to float rounding.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipelines import io
from pipelines.checkpoint import CHECKPOINT_DIR, DATASET_REF_FILE, METRICS_FILE

BASELINES = ("popularity",)


@dataclass(frozen=True)
class EvaluateResult:
    source: dict[str, str]  # {"embeddings" | "model" | "baseline": ...}
    dataset: str
    settings: dict[str, Any]  # ks, max_users, seed
    metrics: dict[str, float]
    # metrics.json "best" of the model, for the same keys, when comparable (same dataset, settings)
    training_reported: dict[str, float] | None
    max_abs_difference: float | None
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="published embedding dir (Contract 4)")
    source.add_argument("--model", help="model dir (Contract 3): embedded on Ray first")
    source.add_argument("--baseline", choices=BASELINES, help="score a baseline instead")
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset dir (default: the one the embeddings or the model came from)",
    )
    parser.add_argument(
        "--ks", default=None, help="comma-separated cut-offs (default: the model's train.eval_ks)"
    )
    parser.add_argument(
        "--max-users",
        type=int,
        default=None,
        help="score a seeded sample of eval users (default: the model's train.eval_max_users)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="sample seed (default: the model's train.seed)"
    )
    parser.add_argument("--report", default=None, help="write the report as JSON to this path")
    parser.add_argument("--address", default=None, help="Ray cluster address (with --model)")


def _same_path(a: str, b: str) -> bool:
    return io.resolve(str(a))[1].rstrip("/") == io.resolve(str(b))[1].rstrip("/")


def _training_reported(
    model: str | None, dataset: str, settings, metrics: dict[str, float]
) -> dict[str, float] | None:
    """The model's logged best-epoch metrics, when they were computed the same way."""
    from pipelines.evaluation import settings_of_model

    if model is None or not io.is_complete(model):
        return None
    trained_on = io.read_json(io.join(model, CHECKPOINT_DIR, DATASET_REF_FILE))["dataset"]
    if not _same_path(trained_on, dataset) or settings_of_model(model) != settings:
        return None
    best = io.read_json(io.join(model, METRICS_FILE)).get("best") or {}
    reported = {key: float(best[key]) for key in metrics if key in best}
    return reported or None


def run(
    *,
    dataset: str | None = None,
    embeddings: str | None = None,
    model: str | None = None,
    baseline: str | None = None,
    ks: tuple[int, ...] | None = None,
    max_users: int | None = None,
    seed: int | None = None,
    address: str | None = None,
) -> EvaluateResult:
    """Evaluate exactly one of ``embeddings``, ``model``, ``baseline``.

    ``ks``, ``max_users`` and ``seed`` left as None take the model's training settings.
    """
    dataset, embeddings, model = io.absolute(dataset), io.absolute(embeddings), io.absolute(model)
    from pipelines.evaluation import (
        EvalSettings,
        evaluate_embeddings,
        evaluate_popularity,
        settings_of_model,
    )
    from pipelines.retrieval import read_manifest

    if sum(x is not None for x in (embeddings, model, baseline)) != 1:
        raise ValueError("give exactly one of --embeddings, --model, --baseline")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")
    if embeddings is not None:
        manifest = read_manifest(embeddings)
        model = manifest.get("model")
        dataset = dataset or manifest.get("dataset")
    elif model is not None:
        if not io.is_complete(model):
            raise FileNotFoundError(f"--model {model}: not a published model dir (no _SUCCESS)")
        dataset = (
            dataset or io.read_json(io.join(model, CHECKPOINT_DIR, DATASET_REF_FILE))["dataset"]
        )
    if dataset is None:
        raise ValueError("--dataset is required with --baseline")
    if not io.is_complete(dataset):
        raise FileNotFoundError(f"--dataset {dataset}: not a complete dataset dir (no _SUCCESS)")

    known_model = model if model is not None and io.is_complete(model) else None
    settings = settings_of_model(known_model) if known_model else EvalSettings()
    settings = replace(
        settings,
        **{
            key: value
            for key, value in (("ks", ks), ("max_users", max_users), ("seed", seed))
            if value is not None
        },
    )
    options = {"ks": settings.ks, "max_users": settings.max_users, "seed": settings.seed}
    if baseline is not None:
        metrics = evaluate_popularity(dataset, **options)
        source = {"baseline": baseline}
    elif embeddings is not None:
        metrics = evaluate_embeddings(embeddings, dataset, **options)
        source = {"embeddings": str(embeddings)}
    else:
        from jobs import embed

        with tempfile.TemporaryDirectory() as scratch:
            out = io.join(scratch, "embeddings")
            embed.run(model=model, out=out, dataset=dataset, address=address)
            metrics = evaluate_embeddings(out, dataset, **options)
        source = {"model": str(model)}

    reported = (
        _training_reported(known_model, dataset, settings, metrics) if baseline is None else None
    )
    return EvaluateResult(
        source=source,
        dataset=str(dataset),
        settings={"ks": list(settings.ks), "max_users": settings.max_users, "seed": settings.seed},
        metrics=metrics,
        training_reported=reported,
        max_abs_difference=(
            max(abs(metrics[key] - value) for key, value in reported.items()) if reported else None
        ),
        created_at=io.utc_now(),
    )


def run_from_args(args: argparse.Namespace) -> int:
    try:
        ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else None
    except ValueError:
        raise ValueError(f"--ks: expected comma-separated integers, got {args.ks!r}") from None
    result = run(
        dataset=args.dataset,
        embeddings=args.embeddings,
        model=args.model,
        baseline=args.baseline,
        ks=ks,
        max_users=args.max_users,
        seed=args.seed,
        address=args.address,
    )
    if args.report:
        io.write_json(args.report, result.to_dict())
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    if result.max_abs_difference is not None:
        print(
            f"largest difference from the training job's logged metrics: {result.max_abs_difference:.2e}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower evaluate", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
