"""Score a model or an embedding dir on a dataset's eval split: Recall@K, HitRate@K, NDCG@K,
MRR and coverage over the full catalog, excluding each user's train positives. Writes a JSON
report (--report) and prints the numbers; --baseline popularity scores MostPop instead.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from pipelines import io


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="embedding dir (Contract 4)")
    source.add_argument("--model", help="model dir (Contract 3): embeds on a local Ray first")
    source.add_argument("--baseline", choices=["popularity"], help="score a baseline instead")
    parser.add_argument(
        "--dataset", default=None, help="dataset dir (default: the one the model was trained on)"
    )
    parser.add_argument(
        "--ks", default="10,50,100", help="comma-separated cutoffs (default 10,50,100)"
    )
    parser.add_argument(
        "--max-users", type=int, default=None, help="score a seeded sample of eval users"
    )
    parser.add_argument("--report", default=None, help="write the metrics as JSON to this path")
    parser.add_argument("--address", default=None, help="Ray cluster address (with --model)")


def run(
    *,
    dataset: str | None,
    embeddings: str | None = None,
    model: str | None = None,
    baseline: str | None = None,
    ks=(10, 50, 100),
    max_users: int | None = None,
    address: str | None = None,
) -> dict:
    from pipelines.evaluation import evaluate_embeddings, evaluate_popularity

    if embeddings is not None:
        if not io.is_complete(embeddings):
            raise FileNotFoundError(
                f"--embeddings {embeddings}: not a published embedding dir (no _SUCCESS)"
            )
        dataset = dataset or io.read_json(io.join(embeddings, "manifest.json"))["dataset"]
    if model is not None:
        if not io.is_complete(model):
            raise FileNotFoundError(f"--model {model}: not a published model dir (no _SUCCESS)")
        dataset = dataset or io.read_json(io.join(model, "checkpoint", "dataset.json"))["dataset"]
    if dataset is None:
        raise ValueError("--dataset is required with --baseline")
    if not io.is_complete(dataset):
        raise FileNotFoundError(f"--dataset {dataset}: not a complete dataset dir (no _SUCCESS)")
    if baseline == "popularity":
        metrics = evaluate_popularity(dataset, ks=ks, max_users=max_users)
        source = {"baseline": "popularity"}
    elif embeddings is not None:
        metrics = evaluate_embeddings(embeddings, dataset, ks=ks, max_users=max_users)
        source = {"embeddings": str(embeddings)}
    else:
        from jobs import embed

        with tempfile.TemporaryDirectory() as scratch:
            out = io.join(scratch, "embeddings")
            embed.run(model=model, out=out, dataset=dataset, address=address)
            metrics = evaluate_embeddings(out, dataset, ks=ks, max_users=max_users)
        source = {"model": str(model)}
    return {**source, "dataset": str(dataset), "metrics": metrics, "created_at": io.utc_now()}


def run_from_args(args: argparse.Namespace) -> int:
    ks = tuple(int(k) for k in args.ks.split(","))
    report = run(
        dataset=args.dataset,
        embeddings=args.embeddings,
        model=args.model,
        baseline=args.baseline,
        ks=ks,
        max_users=args.max_users,
        address=args.address,
    )
    if args.report:
        io.write_json(args.report, report)
    print(json.dumps(report["metrics"], indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower evaluate", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
