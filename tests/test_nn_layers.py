"""Every mlx.nn layer that has parameters, in a small model, trained a few
steps with FusedSGD and with stock optim.SGD (momentum, Nesterov, dampening,
weight decay): the same params, non-trainable state (BatchNorm's running
statistics, frozen quantized weights) and optimizer state, bit for bit
(float32, CPU)."""

import inspect

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal

# Once, on the CPU: the bit-for-bit contract is float32 on the CPU.
pytestmark = pytest.mark.devices("cpu")


def _x(*shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed))


class Wrap(nn.Module):
    """A layer, how to call it, and a trainable Linear head when the layer
    itself has nothing trainable (frozen quantized layers)."""

    def __init__(self, layer, call, head=None):
        super().__init__()
        self.layer = layer
        self.head = head
        self._call = call

    def __call__(self):
        y = self._call(self.layer)
        if isinstance(y, tuple):  # LSTM: (hidden, cell)
            y = y[0] + y[1]
        if self.head is not None:
            y = self.head(y)
        return (y.astype(mx.float32) ** 2).mean()


def _transformer_call(layer):
    src, tgt = _x(2, 5, 16), _x(2, 4, 16, seed=1)
    mask = nn.MultiHeadAttention.create_additive_causal_mask(4)
    return layer(src, tgt, None, mask, None)


# One small model per layer class: (layer factory, call).
LAYERS = {
    "Linear": (lambda: nn.Linear(8, 6), lambda m: m(_x(4, 8))),
    "Bilinear": (lambda: nn.Bilinear(5, 4, 3), lambda m: m(_x(6, 5), _x(6, 4, seed=1))),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda m: m(_x(2, 9, 3))),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2), lambda m: m(_x(2, 7, 7, 3))),
    "Conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda m: m(_x(1, 4, 4, 4, 2))),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(3, 4, 3), lambda m: m(_x(2, 6, 3))),
    "ConvTranspose2d": (
        lambda: nn.ConvTranspose2d(3, 2, 3, stride=2),
        lambda m: m(_x(1, 4, 4, 3)),
    ),
    "ConvTranspose3d": (
        lambda: nn.ConvTranspose3d(2, 2, 2),
        lambda m: m(_x(1, 3, 3, 3, 2)),
    ),
    "Embedding": (
        lambda: nn.Embedding(20, 8),
        lambda m: m(mx.array([[1, 5, 5, 19], [0, 2, 3, 4]])),
    ),
    "RNN": (lambda: nn.RNN(4, 6), lambda m: m(_x(2, 5, 4))),
    "GRU": (lambda: nn.GRU(4, 6), lambda m: m(_x(2, 5, 4))),
    "LSTM": (lambda: nn.LSTM(4, 6), lambda m: m(_x(2, 5, 4))),
    "MultiHeadAttention": (
        lambda: nn.MultiHeadAttention(16, 4, bias=True),
        lambda m: m(_x(2, 5, 16), _x(2, 6, 16, seed=1), _x(2, 6, 16, seed=2)),
    ),
    "Transformer": (
        lambda: nn.Transformer(
            dims=16,
            num_heads=4,
            num_encoder_layers=1,
            num_decoder_layers=1,
            mlp_dims=32,
            dropout=0.0,
        ),
        _transformer_call,
    ),
    "TransformerEncoder": (
        lambda: nn.TransformerEncoder(2, 16, 4, mlp_dims=32),
        lambda m: m(_x(2, 5, 16), None),
    ),
    "TransformerEncoderLayer": (
        lambda: nn.TransformerEncoderLayer(16, 4, mlp_dims=32, norm_first=False),
        lambda m: m(_x(2, 5, 16), None),
    ),
    "TransformerDecoder": (
        lambda: nn.TransformerDecoder(1, 16, 4, mlp_dims=32),
        lambda m: m(_x(2, 4, 16), _x(2, 5, 16, seed=1), None, None),
    ),
    "TransformerDecoderLayer": (
        lambda: nn.TransformerDecoderLayer(16, 4, mlp_dims=32),
        lambda m: m(_x(2, 4, 16), _x(2, 5, 16, seed=1), None, None),
    ),
    "LayerNorm": (lambda: nn.LayerNorm(8), lambda m: m(_x(3, 8) * 3 + 1)),
    "RMSNorm": (lambda: nn.RMSNorm(8), lambda m: m(_x(3, 8) * 3 + 1)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 8), lambda m: m(_x(2, 5, 8) * 3 + 1)),
    "InstanceNorm": (
        lambda: nn.InstanceNorm(4, affine=True),
        lambda m: m(_x(2, 5, 5, 4) * 3 + 1),
    ),
    "BatchNorm": (lambda: nn.BatchNorm(6), lambda m: m(_x(8, 6) * 3 + 1)),
    "PReLU": (lambda: nn.PReLU(5), lambda m: m(_x(4, 5))),
    "QuantizedLinear": (
        lambda: nn.QuantizedLinear(64, 32, group_size=32, bits=4),
        lambda m: m(_x(3, 64)),
    ),
    "QuantizedEmbedding": (
        lambda: nn.QuantizedEmbedding(16, 64, group_size=32, bits=4),
        lambda m: m(mx.array([[1, 3, 3, 15]])),
    ),
    "AllToShardedLinear": (lambda: nn.AllToShardedLinear(8, 6), lambda m: m(_x(4, 8))),
    "ShardedToAllLinear": (lambda: nn.ShardedToAllLinear(8, 6), lambda m: m(_x(4, 8))),
    "QuantizedAllToShardedLinear": (
        lambda: nn.QuantizedAllToShardedLinear(64, 32, group_size=32, bits=4),
        lambda m: m(_x(3, 64)),
    ),
    "QuantizedShardedToAllLinear": (
        lambda: nn.QuantizedShardedToAllLinear(64, 32, group_size=32, bits=4),
        lambda m: m(_x(3, 64)),
    ),
}
# Quantized layers freeze their weights: a trainable head follows them.
HEADS = {
    "QuantizedLinear": 32,
    "QuantizedEmbedding": 64,
    "QuantizedAllToShardedLinear": 32,
    "QuantizedShardedToAllLinear": 32,
}
# mlx.nn classes without parameters (or that are containers of other
# layers), and those not trained here with the reason.
WITHOUT_PARAMETERS = {
    "ALiBi", "AvgPool1d", "AvgPool2d", "AvgPool3d", "CELU", "Dropout", "Dropout2d",
    "Dropout3d", "ELU", "GELU", "GLU", "HardShrink", "HardTanh", "Hardswish",
    "Identity", "LeakyReLU", "LogSigmoid", "LogSoftmax", "MaxPool1d", "MaxPool2d",
    "MaxPool3d", "Mish", "ReLU", "ReLU2", "ReLU6", "RoPE", "SELU", "SiLU", "Sigmoid",
    "SinusoidalPositionalEncoding", "Softmax", "Softmin", "Softplus", "Softshrink",
    "Softsign", "Step", "Tanh", "Upsample",
    "Module", "Sequential", "FullyShardedModule",
}  # fmt: skip
NOT_TRAINED = {
    "QQLinear": "in training mode its matmul raises '[QQMatmul] NYI for the "
    "general case' on the CPU (MLX 0.32.4), for stock SGD too",
}

OPTIONS = [
    dict(momentum=0.9, weight_decay=1e-4),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.7, dampening=0.3),
    dict(weight_decay=1e-2),
]


def _model(name, seed=0):
    make, call = LAYERS[name]
    mx.random.seed(seed)
    head = nn.Linear(HEADS[name], 3) if name in HEADS else None
    model = Wrap(make(), call, head)
    mx.eval(model.parameters())
    return model


def _train(model, optimizer, steps=3):
    loss_and_grad = nn.value_and_grad(model, lambda m: m())
    losses = []
    for _ in range(steps):
        loss, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        losses.append(loss)
    return losses


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_gives_stock_bits(name, options):
    model = _model(name)
    stock_model = _model(name)
    initial = tree_map(lambda x: x, model.parameters())
    stock_model.update(initial)
    model.train()
    stock_model.train()
    fused = mfs.FusedSGD(mfs.step_decay(0.1, 0.5, 2), **options)
    stock = optim.SGD(optim.step_decay(0.1, 0.5, 2), **options)
    got, want = _train(model, fused), _train(stock_model, stock)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bitwise_equal(a, b, f"loss {i}")
    # Every parameter, trainable or not (running statistics, frozen weights).
    ours, theirs = (
        dict(tree_flatten(model.parameters())),
        dict(tree_flatten(stock_model.parameters())),
    )
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert_bitwise_equal(ours[k], theirs[k], k)
    stock_state = dict(tree_flatten(stock.state))
    for k, v in tree_flatten(fused.state):
        assert_bitwise_equal(v, stock_state[k], f"state {k}")
    # Something trained, and what is not trainable stayed put.
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    moved = {
        k
        for k, a in tree_flatten(initial)
        if k in trainable and not mx.array_equal(a, ours[k]).item()
    }
    assert moved
    if name == "BatchNorm":
        assert "layer.running_mean" not in trainable
        assert not mx.array_equal(
            initial["layer"]["running_mean"], ours["layer.running_mean"]
        )
    for k, a in tree_flatten(initial):
        if k not in trainable and name != "BatchNorm":
            assert_bitwise_equal(ours[k], a, f"frozen {k}")


def test_every_layer_class_is_covered():
    """A layer class of mlx.nn is trained above, has no parameters, or is
    listed with the reason it is not: a new class must be placed."""
    classes = {
        n
        for n, c in vars(nn).items()
        if inspect.isclass(c) and issubclass(c, nn.Module)
    }
    placed = set(LAYERS) | WITHOUT_PARAMETERS | set(NOT_TRAINED)
    assert classes - placed == set()
    for name in WITHOUT_PARAMETERS - {"Module", "Sequential", "FullyShardedModule"}:
        cls = getattr(nn, name)
        try:
            layer = cls() if name not in ("GLU",) else cls(-1)
        except TypeError:
            continue  # needs arguments; its class has no parameters either way
        assert not tree_flatten(layer.trainable_parameters()), name
