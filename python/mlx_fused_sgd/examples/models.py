"""Small real ``mlx.nn`` models and their losses: the workloads of the
benchmark's real-gradient tables and of the layout tests.

Their gradients have the layouts MLX really produces: every ``nn.Linear``
weight gradient (attention and MLP projections included) arrives from
``nn.value_and_grad`` as a transposed view, so an optimizer that is fast
only on row-contiguous arrays is slow on all of them.

Each workload is a model and a function drawing a batch; ``loss(model,
*batch)`` is what ``nn.value_and_grad`` differentiates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


class MLP(nn.Module):
    """ReLU layers of ``nn.Linear``."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention and a 4x MLP, as in GPT-2."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.attention = nn.MultiHeadAttention(dims, heads, bias=True)
        self.norm2 = nn.LayerNorm(dims)
        self.up = nn.Linear(dims, 4 * dims)
        self.down = nn.Linear(4 * dims, dims)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, mask)
        return x + self.down(nn.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    """A decoder-only transformer: token and position embeddings, blocks,
    a final norm and an output projection."""

    def __init__(
        self, vocab: int, dims: int, heads: int, layers: int, context: int
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dims)
        self.position = nn.Embedding(context, dims)
        self.blocks = [DecoderBlock(dims, heads) for _ in range(layers)]
        self.norm = nn.LayerNorm(dims)
        self.head = nn.Linear(dims, vocab, bias=False)

    def __call__(self, tokens: mx.array) -> mx.array:
        length = tokens.shape[1]
        x = self.embedding(tokens) + self.position(mx.arange(length))
        mask = nn.MultiHeadAttention.create_additive_causal_mask(length)
        for block in self.blocks:
            x = block(x, mask.astype(x.dtype))
        return self.head(self.norm(x))


class ConvNet(nn.Module):
    """Conv2d + BatchNorm + ReLU stages (the later ones strided), global
    average pooling and a linear head."""

    def __init__(self, channels: list[int], classes: int) -> None:
        super().__init__()
        self.convs = [
            nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
            for i, (a, b) in enumerate(zip(channels[:-1], channels[1:]))
        ]
        self.norms = [nn.BatchNorm(b) for b in channels[1:]]
        self.head = nn.Linear(channels[-1], classes)

    def __call__(self, x: mx.array) -> mx.array:
        for conv, norm in zip(self.convs, self.norms):
            x = nn.relu(norm(conv(x)))
        return self.head(mx.mean(x, axis=(1, 2)))


@dataclass
class Workload:
    """A model, a batch sampler and the loss of a batch."""

    name: str
    model: nn.Module
    batch: Callable[[mx.array], tuple[mx.array, ...]]
    loss: Callable[..., mx.array]


def _mse(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.mse_loss(model(x), y, reduction="mean")


def _next_token(model: nn.Module, tokens: mx.array) -> mx.array:
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")


def _classify(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def mlp(dims: list[int], batch: int) -> Workload:
    """An MLP regressing random targets."""

    def sample(key: mx.array) -> tuple[mx.array, ...]:
        kx, ky = mx.random.split(key)
        return (
            mx.random.normal((batch, dims[0]), key=kx),
            mx.random.normal((batch, dims[-1]), key=ky),
        )

    return Workload("mlp", MLP(dims), sample, _mse)


def gpt(
    vocab: int, dims: int, heads: int, layers: int, context: int, batch: int
) -> Workload:
    """A GPT-style decoder predicting the next of random tokens."""

    def sample(key: mx.array) -> tuple[mx.array, ...]:
        return (mx.random.randint(0, vocab, (batch, context + 1), key=key),)

    return Workload(
        "gpt", GPT(vocab, dims, heads, layers, context), sample, _next_token
    )


def convnet(channels: list[int], classes: int, image: int, batch: int) -> Workload:
    """A convnet classifying random NHWC images."""

    def sample(key: mx.array) -> tuple[mx.array, ...]:
        kx, ky = mx.random.split(key)
        return (
            mx.random.normal((batch, image, image, channels[0]), key=kx),
            mx.random.randint(0, classes, (batch,), key=ky),
        )

    return Workload("convnet", ConvNet(channels, classes), sample, _classify)
