"""all_gather_with_grad and the gathered in-batch loss, in a real 2-process gloo group."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from twotower_core.config import LossConfig
from twotower_core.distributed import all_gather_with_grad, all_gather_with_offset, is_distributed
from twotower_core.negatives import UserPositives
from twotower_core.task import build_task

WORLD_SIZE = 2
FULL_BATCH = 6
# Rows held by rank 0 in each scenario: an even split, and an uneven one (padding path).
SPLITS = (3, 2)
COUNTS = torch.tensor([4.0, 0.0, 9.0, 2.0, 1.0, 6.0])
CONFIG = LossConfig(
    name="in_batch_softmax",
    temperature=0.5,
    symmetric=True,
    logq_correction=True,
    accidental_hit_masking=True,
)


# Each row's user, and the train (user, item) pairs: every row's own pair plus other items of
# the same users, some of them another row's positive (false negatives across the shards).
USERS = torch.tensor([0, 1, 0, 2, 1, 3])
PAIRS = (torch.tensor([0, 1, 0, 2, 1, 3, 0, 0, 1]), torch.tensor([0, 2, 3, 5, 2, 1, 5, 2, 0]))
MASKED = dataclasses.replace(CONFIG, mask_user_positives=True)


def masked_task(config: LossConfig):
    return build_task(config, item_counts=COUNTS, user_positives=UserPositives(*PAIRS, num_items=6))


def full_batch():
    generator = torch.Generator().manual_seed(0)
    user = torch.randn(FULL_BATCH, 4, generator=generator, dtype=torch.float64)
    item = torch.randn(FULL_BATCH, 4, generator=generator, dtype=torch.float64)
    # Rows 1 and 4 share item 2: an accidental hit across the two workers' shards.
    ids = torch.tensor([0, 2, 3, 5, 2, 1])
    return user, item, ids


def rows_of(rank: int, rank0_rows: int) -> slice:
    return slice(0, rank0_rows) if rank == 0 else slice(rank0_rows, FULL_BATCH)


def _worker(rank: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        results = {}
        for rank0_rows in SPLITS:
            user, item, ids = full_batch()
            rows = rows_of(rank, rank0_rows)
            local_user = user[rows].clone().requires_grad_()
            local_item = item[rows].clone().requires_grad_()
            task = build_task(
                dataclasses.replace(CONFIG, gather_across_workers=True), item_counts=COUNTS
            )
            loss = task(local_user, local_item, pos_item_idx_B=ids[rows])
            # DDP sums (then averages) gradients over workers; weighting each worker's row mean
            # by its share of rows makes the sum over workers the full-batch mean.
            share = local_user.shape[0] / FULL_BATCH
            (loss * share).backward()
            results[rank0_rows] = (
                loss.item(),
                share,
                local_user.grad.tolist(),
                local_item.grad.tolist(),
            )
            masked = masked_task(dataclasses.replace(MASKED, gather_across_workers=True))
            loss = masked(user[rows], item[rows], pos_item_idx_B=ids[rows], user_idx_B=USERS[rows])
            results["masked", rank0_rows] = (loss.item(), share)

        x = torch.arange(3.0, dtype=torch.float64).add(10 * rank).view(3, 1).requires_grad_()
        gathered, offset = all_gather_with_offset(x)
        weights = torch.arange(1.0, 7.0, dtype=torch.float64).view(6, 1)
        (gathered * weights).sum().backward()
        ids_gathered = all_gather_with_grad(torch.tensor([rank, rank]))
        results["raw"] = (gathered.tolist(), offset, x.grad.tolist(), ids_gathered.tolist())
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def worker_results():
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(rank, port, queue)) for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    for process in processes:
        if process.is_alive():  # a hung rendezvous: stop our own children, then fail
            process.terminate()
            process.join()
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    results = dict(queue.get() for _ in range(WORLD_SIZE))
    return results


def test_identity_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert not is_distributed()
    assert all_gather_with_grad(x) is x
    assert all_gather_with_offset(x) == (x, 0)


def test_gather_concatenates_in_rank_order_and_sums_gradients(worker_results):
    for rank in range(WORLD_SIZE):
        gathered, offset, grad, ids = worker_results[rank]["raw"]
        assert gathered == [[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]]
        assert offset == 3 * rank
        assert ids == [0, 0, 1, 1]
        # Both workers' objective Σ w·g uses every row: the local rows' gradient is their w, summed
        # over the 2 workers: rank 0 gets 2·(1, 2, 3), rank 1 gets 2·(4, 5, 6).
        assert grad == [[2.0 * (3 * rank + k + 1)] for k in range(3)]


@pytest.mark.parametrize("rank0_rows", SPLITS)
def test_gathered_loss_equals_single_process_full_batch_loss(worker_results, rank0_rows):
    user, item, ids = full_batch()
    user.requires_grad_()
    item.requires_grad_()
    full = build_task(CONFIG, item_counts=COUNTS)(user, item, pos_item_idx_B=ids)
    full.backward()
    combined = sum(
        worker_results[rank][rank0_rows][0] * worker_results[rank][rank0_rows][1]
        for rank in range(WORLD_SIZE)
    )
    assert combined == pytest.approx(full.item(), rel=1e-12)
    if rank0_rows * 2 == FULL_BATCH:
        # Equal shards: the plain mean of the workers' losses is the full-batch loss.
        assert sum(
            worker_results[r][rank0_rows][0] for r in range(WORLD_SIZE)
        ) / WORLD_SIZE == pytest.approx(full.item())
    rows = {
        k: [row for r in range(WORLD_SIZE) for row in worker_results[r][rank0_rows][k]]
        for k in (2, 3)
    }
    user_grad = torch.tensor(rows[2], dtype=torch.float64)
    item_grad = torch.tensor(rows[3], dtype=torch.float64)
    torch.testing.assert_close(user_grad, user.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(item_grad, item.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rank0_rows", SPLITS)
def test_gathered_user_positive_masking_equals_the_full_batch_loss(worker_results, rank0_rows):
    # Symmetric and gathered: both directions leave out the same (user, item) pairs, across
    # the workers' shards.
    user, item, ids = full_batch()
    full = masked_task(MASKED)(user, item, pos_item_idx_B=ids, user_idx_B=USERS).item()
    unmasked = build_task(CONFIG, item_counts=COUNTS)(user, item, pos_item_idx_B=ids).item()
    assert full != pytest.approx(unmasked)
    combined = sum(
        worker_results[rank]["masked", rank0_rows][0]
        * worker_results[rank]["masked", rank0_rows][1]
        for rank in range(WORLD_SIZE)
    )
    assert combined == pytest.approx(full, rel=1e-12)


def test_without_gathering_a_worker_sees_only_its_shard():
    # The contrast that makes the test above meaningful: local-only losses differ from the full one.
    user, item, ids = full_batch()
    task = build_task(CONFIG, item_counts=COUNTS)
    full = task(user, item, pos_item_idx_B=ids).item()
    local = (
        task(user[:3], item[:3], pos_item_idx_B=ids[:3]).item()
        + task(user[3:], item[3:], pos_item_idx_B=ids[3:]).item()
    ) / 2
    assert local != pytest.approx(full)
