"""Data-parallel training with FusedSGD on MLX's own distributed engine.

Each process (rank) computes gradients on its shard of every batch, the
gradients are averaged across ranks with ``mlx.nn.average_gradients``
(``mx.distributed.all_sum`` underneath), and every rank steps its own
:class:`~mlx_fused_sgd.FusedSGD` with the same averaged gradients, so the
params stay identical on all ranks. With ``max_grad_norm`` the norm is taken
of the averaged gradients: the global norm of the combined batch.

Two processes on this machine, MLX's ring backend over loopback::

    mlx.launch --backend ring -n 2 python -m mlx_fused_sgd.examples.data_parallel

Run without the launcher it trains in one process (a group of size 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

FEATURES, CLASSES = 16, 4


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, 64)
        self.out = nn.Linear(64, CLASSES)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out(nn.relu(self.hidden(x)))


def loss_fn(model: Classifier, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def batch(step: int, size: int) -> tuple[mx.array, mx.array]:
    """The combined batch of one step: the same on every rank."""
    kx, ky = mx.random.split(mx.random.key(1000 + step))
    return mx.random.normal((size, FEATURES), key=kx), mx.random.randint(
        0, CLASSES, (size,), key=ky
    )


def shard(x: mx.array, rank: int, world: int) -> mx.array:
    """Rank's contiguous equal share of the batch's rows."""
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n]


def make_optimizer(max_grad_norm: float | None) -> mfs.FusedSGD:
    return mfs.FusedSGD(
        mfs.step_decay(0.1, 0.9, 3),
        momentum=0.9,
        weight_decay=1e-4,
        max_grad_norm=max_grad_norm,
    )


def make_model() -> Classifier:
    mx.random.seed(0)  # the same initial params on every rank
    model = Classifier()
    mx.eval(model.parameters())
    return model


def train(
    steps: int,
    batch_size: int,
    max_grad_norm: float | None,
    group: mx.distributed.Group | None = None,
) -> tuple[Classifier, mfs.FusedSGD]:
    """Train on the group's ranks (this process is one of them)."""
    group = group or mx.distributed.init()
    rank, world = group.rank(), group.size()
    if batch_size % world:
        raise ValueError(
            f"batch_size ({batch_size}) must divide evenly among {world} ranks."
        )
    model = make_model()
    optimizer = make_optimizer(max_grad_norm)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    for step in range(steps):
        x, y = batch(step, batch_size)
        _, grads = loss_and_grad(model, shard(x, rank, world), shard(y, rank, world))
        # The mean of the shards' mean-loss gradients is the gradient of the
        # combined batch's mean loss (equal shards).
        grads = nn.average_gradients(grads, group=group)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-grad-norm", type=float, default=None)
    parser.add_argument(
        "--out", type=Path, default=None, help="save rank<k>.safetensors here"
    )
    args = parser.parse_args()
    group = mx.distributed.init()
    model, optimizer = train(args.steps, args.batch_size, args.max_grad_norm, group)
    flat = dict(tree_flatten(model.parameters()))
    if optimizer.last_grad_norm is not None:
        flat["last_grad_norm"] = optimizer.last_grad_norm
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(args.out / f"rank{group.rank()}.safetensors"), flat)
    x, y = batch(args.steps, args.batch_size)
    print(
        f"rank {group.rank()}/{group.size()}: {args.steps} steps, "
        f"loss on a fresh batch {loss_fn(model, x, y).item():.4f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
