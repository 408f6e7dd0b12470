"""Train the user and item towers on Ray Train (TorchTrainer, DDP over gloo, or NCCL with
--use-gpu) from a dataset dir written by build-dataset, and publish a model dir (Contract 3):
checkpoint/ (weights, resolved config, vocab), metrics.json, train_log.csv, _SUCCESS.

The loss, similarity and every hyperparameter come from the YAML config (--config, --set).
Training state is kept next to the output (.<name>._train/) until the model is published, so
rerunning the same command after a crash resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

from jobs.config_io import add_config_arguments, load_config
from pipelines import io
from pipelines.checkpoint import write_model_dir
from twotower_core.config import Config, config_to_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    out: str
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, Any]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset dir written by build-dataset")
    parser.add_argument("--out", required=True, help="model dir to write (Contract 3)")
    add_config_arguments(parser)
    parser.add_argument(
        "--num-workers", type=int, default=None, help="Ray Train workers (train.num_workers)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs (train.epochs)")
    parser.add_argument(
        "--init-from",
        default=None,
        help="warm start from this model dir: known ids keep their rows",
    )
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, DDP over NCCL")
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model dir")


def state_dir_for(out: str) -> str:
    """Where Ray Train keeps checkpoints until the model is published (stable, for resume)."""
    out = str(out).rstrip("/")
    parent, name = os.path.split(out) if "://" not in out else out.rsplit("/", 1)
    return io.join(parent or ".", f".{name}._train")


def check_inputs(dataset: str, *, init_from: str | None) -> None:
    """Fail before Ray starts when an input is missing or incomplete."""
    from pipelines.contracts import validate_dataset_dir

    validate_dataset_dir(dataset)
    if init_from is not None and not io.is_complete(init_from):
        raise FileNotFoundError(f"--init-from {init_from}: not a published model dir (no _SUCCESS)")


def infer_specs(dataset: str, config: Config):
    """(user specs, item specs) of the dataset's feature tables; a bad
    ``model.user_history_feature`` fails here, before Ray starts."""
    from pipelines.local_train import feature_specs
    from pipelines.train_loop import load_history_codes

    user_specs, item_specs = feature_specs(dataset, config)
    # The workers build the codes themselves; this only checks the feature early.
    load_history_codes(dataset, user_specs, config)
    return user_specs, item_specs


def run(
    *,
    dataset: str,
    out: str,
    config: Config,
    init_from: str | None = None,
    address: str | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train and publish. Inputs are checked before any Ray work starts."""
    dataset, out, init_from = io.absolute(dataset), io.absolute(out), io.absolute(init_from)
    check_inputs(dataset, init_from=init_from)
    io.check_writable(out, overwrite=overwrite)
    user_specs, item_specs = infer_specs(dataset, config)

    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.ray_runtime import ensure_ray
    from pipelines.train_loop import STATE_FILE, history_csv, train_columns, train_loop_per_worker

    ensure_ray(address)
    t = config.train
    state_dir = state_dir_for(out)
    train_rows = io.ray_read_parquet(io.join(dataset, "train"), columns=train_columns(config.loss))
    if t.materialize_dataset:
        train_rows = train_rows.materialize()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config_to_dict(config),
            "dataset": str(dataset),
            "user_specs": [s.to_dict() for s in user_specs],
            "item_specs": [s.to_dict() for s in item_specs],
            "init_from": init_from,
            "state_dir": state_dir,
            "train_rows": io.count_rows(io.join(dataset, "train")),
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=RunConfig(
            name="run",
            storage_path=state_dir,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_rows},
    )
    logger.info(
        "training %s on %d workers; state in %s", config.loss.name, t.num_workers, state_dir
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        saved = torch.load(
            os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False
        )
        state = saved["state"]
        payload = torch.load(
            os.path.join(directory, "best_model.pt"), map_location="cpu", weights_only=False
        )

    best_row = state.history[state.best_epoch - 1] if state.best_epoch >= 1 else state.history[-1]
    metrics = {
        "early_stopping_metric": t.early_stopping_metric,
        "best_epoch": state.best_epoch,
        "best": best_row,
        "epochs": state.history,
        "global_step": state.global_step,
        "resumed_at_steps": state.resumed_at_steps,
        "warm_start": state.warm_start,
        "loss": config.loss.name,
        "similarity": config.loss.similarity,
        "dataset": str(dataset),
        "init_from": init_from,
        "created_at": io.utc_now(),
    }
    with io.staged_output(out, overwrite=overwrite) as staging:
        write_model_dir(
            staging,
            payload=payload,
            config=config,
            dataset_dir=dataset,
            metrics=metrics,
            train_log_csv=history_csv(state.history),
        )
    io.remove(state_dir)
    logger.info("model written to %s (best epoch %d)", out, state.best_epoch)
    return TrainResult(
        out=str(out),
        best_epoch=state.best_epoch,
        best_metrics={k: v for k, v in best_row.items() if isinstance(v, float)},
        history=state.history,
    )


def run_from_args(args: argparse.Namespace) -> int:
    # Flags are sugar for config overrides, so they are validated like any other value.
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.use_gpu:
        overrides.append("train.use_gpu=true")
    config = load_config(args.config, overrides)
    result = run(
        dataset=args.dataset,
        out=args.out,
        config=config,
        init_from=args.init_from,
        address=args.address,
        overwrite=args.overwrite,
    )
    best = ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items() if "@" in k)
    print(f"model: {result.out} (best epoch {result.best_epoch}: {best})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twotower train", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
