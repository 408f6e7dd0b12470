"""The only user of torch.distributed: gathering embeddings across DDP workers with gradients.

Legend: B rows on this worker, G rows on all workers together (Σ of every worker's B).

With ``gather_across_workers``, every worker's in-batch softmax scores its own users against the
items of the global batch. The loss of worker r depends on every worker's item rows, so the
gradient of a gathered row must reach the worker that owns it: the backward pass sums the
gathered gradient over workers (all_reduce) and keeps the local slice. DDP then averages the
parameter gradients over the W workers, which gives the gradient of the mean of the workers'
losses, i.e. the full-batch loss when every worker has the same B.

Workers may hold different B (the last batch of an epoch): sizes are exchanged first and rows are
padded to the largest B for the collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group of more than one worker."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(num_rows: int, device: torch.device) -> list[int]:
    size = torch.tensor([num_rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every worker's rows in rank order: [Σ sizes, ...]."""
    largest = max(sizes)
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int], rank: int) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx, grad_GD: Tensor):  # type: ignore[override]
        grad_GD = grad_GD.contiguous()
        # Every worker's loss used our rows: their gradients add up.
        dist.all_reduce(grad_GD, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad_GD[start : start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_offset(tensor_B: Tensor) -> tuple[Tensor, int]:
    """(every worker's rows in rank order ``[G, ...]``, index of this worker's first row).

    Gradients flow back to the local rows (see the module docstring). Integer tensors are
    gathered without autograd. Outside a process group of 2+ workers: ``(tensor_B, 0)``.
    """
    if not is_distributed():
        return tensor_B, 0
    sizes = _gather_sizes(tensor_B.shape[0], tensor_B.device)
    rank = dist.get_rank()
    offset = sum(sizes[:rank])
    if tensor_B.requires_grad:
        return _AllGatherWithGrad.apply(tensor_B, sizes, rank), offset
    return _gather_padded(tensor_B, sizes), offset


def all_gather_with_grad(tensor_B: Tensor) -> Tensor:
    """Every worker's rows concatenated in rank order, ``[G, ...]``; identity without a group."""
    return all_gather_with_offset(tensor_B)[0]
