"""Training and embedding on a GPU (`--use-gpu`): NCCL, the towers and feature tables on cuda.

Runs only where torch sees a CUDA device: CI has none (these skip there). The Ray job's two
ran on an H200 lent to one session (README, Benchmarks: "train throughput on a GPU"); the
in-process one was added in a session without a GPU and has not run on one yet. What they guard is
what a GPU run can break and a CPU run cannot: tensors left on the wrong device, a checkpoint
that holds cuda tensors and so fails to load on a CPU-only embed cluster, GPU and CPU towers
that disagree.
"""

import numpy as np
import pytest
import torch

from jobs import build_dataset, embed, train
from pipelines import io
from twotower_core.config import DEBUG_PRESET, config_from_dict

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory, ray_local, small_world):
    root = tmp_path_factory.mktemp("gpu")
    dataset = str(root / "dataset")
    build_dataset.run(logs=small_world.out_dir, out=dataset, config=config_from_dict({}))
    # The debug preset's small towers; one worker on the one GPU.
    model = {k: DEBUG_PRESET["model"][k] for k in ("embedding_dim", "id_embedding_dim", "hidden_dims")}
    train_settings = {"use_gpu": True, "num_workers": 1, "epochs": 3, "batch_size": 64}
    config = config_from_dict({"model": model, "train": train_settings})
    result = train.run(dataset=dataset, out=str(root / "model"), config=config)
    return result, root


def test_gpu_training_learns_and_publishes(gpu_model):
    result, _ = gpu_model
    assert io.is_complete(result.out)
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    assert result.best_metrics["recall@50"] > 0


def test_gpu_and_cpu_embeddings_of_a_gpu_model_agree(gpu_model):
    result, root = gpu_model
    tables = {}
    for device in ("cpu", "gpu"):
        config = config_from_dict(
            {}, overrides=[f"embed.use_gpu={'true' if device == 'gpu' else 'false'}"]
        )
        out = embed.run(model=result.out, out=str(root / f"emb-{device}"), config=config).out
        tables[device] = {
            side: io.read_table(io.join(out, side)).sort_by(f"{side[:-1]}_id")
            for side in ("users", "items")
        }
    for side in ("users", "items"):
        cpu, gpu = tables["cpu"][side], tables["gpu"][side]
        assert cpu[f"{side[:-1]}_id"].equals(gpu[f"{side[:-1]}_id"])
        cpu_ND = np.stack(cpu["embedding"].to_numpy(zero_copy_only=False))
        gpu_ND = np.stack(gpu["embedding"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(gpu_ND, cpu_ND, rtol=1e-3, atol=1e-4)


def test_in_process_training_on_the_gpu_matches_the_cpu(tmp_path_factory, small_world, ray_local):
    """``pipelines.local_train`` (tuning and study runs) with ``train.use_gpu``: the same steps
    as on the CPU, so the same losses up to float reordering."""
    from pipelines import local_train

    dataset = str(tmp_path_factory.mktemp("gpu-local") / "dataset")
    build_dataset.run(logs=small_world.out_dir, out=dataset, config=config_from_dict({}))
    losses = {}
    for use_gpu in (False, True):
        config = config_from_dict(
            {"train": {"use_gpu": use_gpu, "num_workers": 1, "epochs": 2, "batch_size": 64}}
        )
        fitted = local_train.fit(dataset, config)
        assert next(fitted.model.parameters()).is_cuda == use_gpu
        losses[use_gpu] = [row["train_loss"] for row in fitted.history]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-3)
