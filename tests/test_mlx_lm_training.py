"""Fine-tuning as mlx-lm users do it, FusedSGD against stock optim.SGD: LoRA
made by mlx-lm's own linear_to_lora_layers on a frozen model, QLoRA (the base
quantized with nn.quantize), mlx-lm's own training loop (its compiled step,
gradient accumulation, learning-rate reports and adapter saving), and
bfloat16 models as mlx-lm loads them."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, train
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal, sgd_reference, small_llama, to_numpy

# Once, on the CPU: the bit-for-bit contract is float32 on the CPU.
pytestmark = pytest.mark.devices("cpu")


VOCAB = 64


def adapt(model: nn.Module, kind: str) -> nn.Module:
    """Full fine-tuning, LoRA or QLoRA, as mlx_lm.lora sets them up."""
    if kind == "qlora":
        nn.quantize(model, group_size=32, bits=4)
    if kind in ("lora", "qlora"):
        model.freeze()
        mx.random.seed(1)
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.eval(model.parameters())
    return model


def twin_models(kind: str) -> tuple[nn.Module, nn.Module]:
    """Two identical models (the same parameters, frozen the same way)."""
    a = adapt(small_llama(VOCAB), kind)
    b = adapt(small_llama(VOCAB), kind)
    b.update(tree_map(lambda x: x, a.parameters()))
    mx.eval(b.parameters())
    return a, b


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    got, want = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert got.keys() == want.keys()
    for k in want:
        assert_bitwise_equal(got[k], want[k], k)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")


def _batches(n: int) -> list[mx.array]:
    return [mx.random.randint(0, VOCAB, (2, 8), key=mx.random.key(i)) for i in range(n)]


def _train_compiled(model, optimizer, batches):
    """MLX's compile idiom, as mlx-lm's trainer uses it."""
    loss_and_grad = nn.value_and_grad(model, _loss)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens):
        loss, grads = loss_and_grad(model, tokens)
        optimizer.update(model, grads)
        return loss

    losses = []
    for tokens in batches:
        losses.append(step(tokens))
        mx.eval(losses[-1], state)
    return losses


OPTIONS = dict(momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_lora_and_qlora_give_stock_bits(kind):
    model, stock_model = twin_models(kind)
    trainable = tree_flatten(model.trainable_parameters())
    assert trainable and all("lora_" in k for k, _ in trainable)
    frozen = tree_map(lambda x: x, model.parameters())
    fused = mfs.FusedSGD(mfs.step_decay(0.5, 0.5, 2), **OPTIONS)
    stock = optim.SGD(optim.step_decay(0.5, 0.5, 2), **OPTIONS)
    batches = _batches(4)
    got = _train_compiled(model, fused, batches)
    want = _train_compiled(stock_model, stock, batches)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bitwise_equal(a, b, f"loss {i}")
    assert_same_params(model, stock_model)
    # Only the adapters moved; the (quantized) base is untouched.
    moved = {
        k
        for (k, a), (_, b) in zip(
            tree_flatten(model.parameters()), tree_flatten(frozen)
        )
        if not mx.array_equal(a, b).item()
    }
    assert moved and all("lora_" in k for k in moved)
    # The state holds momentum for the adapters only, as stock's.
    assert {k for k, _ in tree_flatten(fused.state)} == {
        k for k, _ in tree_flatten(stock.state)
    }


class Reports(TrainingCallback):
    def __init__(self):
        self.train = []

    def on_train_loss_report(self, train_info):
        self.train.append(
            (
                train_info["iteration"],
                train_info["train_loss"],
                train_info["learning_rate"],
            )
        )


def _dataset(n: int = 8) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(0)
    return [(rng.integers(1, VOCAB, 10 + i % 3).tolist(), 0) for i in range(n)]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_mlx_lm_trainer_gives_stock_bits(kind, accumulation, tmp_path):
    """mlx_lm.tuner.trainer.train with FusedSGD and with stock SGD: the same
    reported losses and learning rates, the same params and saved adapters."""
    model, stock_model = twin_models(kind)
    runs = {}
    for label, m, opt in (
        ("fused", model, mfs.FusedSGD(mfs.step_decay(0.2, 0.5, 2), **OPTIONS)),
        ("stock", stock_model, optim.SGD(optim.step_decay(0.2, 0.5, 2), **OPTIONS)),
    ):
        reports = Reports()
        args = TrainingArgs(
            batch_size=2,
            iters=6,
            steps_per_report=1,
            steps_per_eval=1000,
            steps_per_save=3,
            max_seq_length=16,
            grad_accumulation_steps=accumulation,
            adapter_file=str(tmp_path / f"{label}.safetensors"),
        )
        np.random.seed(0)  # the trainer shuffles batches with NumPy's global RNG
        train(m, opt, _dataset(), args=args, training_callback=reports)
        runs[label] = reports.train
    assert len(runs["fused"]) == 6
    assert runs["fused"] == runs["stock"]  # iteration, loss, learning rate
    # The learning rate decays in the reports (the schedule ran).
    rates = [r[2] for r in runs["fused"]]
    assert rates[0] > rates[-1]
    assert_same_params(model, stock_model)
    got = mx.load(str(tmp_path / "fused.safetensors"))
    want = mx.load(str(tmp_path / "stock.safetensors"))
    assert got.keys() == want.keys() and got
    for k in want:
        assert_bitwise_equal(got[k], want[k], k)


def test_bfloat16_model_within_stock_error():
    """A bfloat16 Llama (as mlx-lm loads one) with bfloat16 gradients: at
    every step, FusedSGD's params and momentum are no further from a float64
    reference of that step than stock's, from the same inputs."""
    model = small_llama(VOCAB)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    cfg = dict(momentum=0.9, weight_decay=1e-3, dampening=0.0, nesterov=False)
    lr = float(np.float32(0.0625 + 0.003))
    fused = mfs.FusedSGD(lr, **cfg)
    loss_and_grad = nn.value_and_grad(model, _loss)
    compared = 0
    for tokens in _batches(3):
        _, grads = loss_and_grad(model, tokens)
        params = model.parameters()  # new containers, today's arrays
        old = dict(tree_flatten(params))
        v_before = dict(tree_flatten(fused.state))  # no buffers before step 1
        fused.update(model, grads)
        mx.eval(model.parameters(), fused.state)
        # Stock's step from the same params and momentum buffers.
        stock = optim.SGD(lr, **cfg)
        stock.init(grads)
        for k, v in v_before.items():
            if k.endswith(".v"):
                leaf = stock.state
                for part in k.split(".")[:-1]:
                    leaf = leaf[int(part) if part.isdigit() else part]
                leaf["v"] = v
        stock_params = stock.apply_gradients(grads, params)
        mx.eval(stock_params, stock.state)
        ours = dict(tree_flatten(model.trainable_parameters()))
        theirs = dict(tree_flatten(stock_params))
        g = dict(tree_flatten(grads))
        v_ours = dict(tree_flatten(fused.state))
        v_stock = dict(tree_flatten(stock.state))
        for k in theirs:
            assert ours[k].dtype == mx.bfloat16
            p64, g64 = (to_numpy(x[k]).astype(np.float64) for x in (old, g))
            v64 = (
                to_numpy(v_before[f"{k}.v"]).astype(np.float64)
                if f"{k}.v" in v_before
                else np.zeros_like(p64)
            )
            ref_p, ref_v = sgd_reference(p64, g64, v64, lr, **cfg)
            # float32 evaluation error of a few operations (as
            # tests/test_half_precision.py): matters only where it cancels.
            slack = 8 * 2.0**-24 * (np.abs(p64) + np.abs(g64) + np.abs(v64))
            for what, a, b, ref in (
                ("param", ours[k], theirs[k], ref_p),
                ("momentum", v_ours[f"{k}.v"], v_stock[f"{k}.v"], ref_v),
            ):
                err_ours = np.abs(to_numpy(a).astype(np.float64) - ref)
                err_stock = np.abs(to_numpy(b).astype(np.float64) - ref)
                assert err_ours.max() <= err_stock.max(), f"{what} {k}"
                assert err_ours.mean() <= err_stock.mean(), f"{what} {k}"
                # Rounded once: within half a bfloat16 ulp, plus the slack.
                ulp = np.spacing(np.abs(ref).astype(np.float32)) * 2.0**16
                assert np.all(err_ours <= 0.5 * ulp + slack), f"{what} {k}"
                compared += 1
    assert compared > 20
