"""Long runs, exact step counting, checkpoints across processes, and
concurrency."""

import gc
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# Soak
# --------------------------------------------------------------------------


def _settled_active_memory() -> int:
    gc.collect()
    mx.synchronize()
    return mx.get_active_memory()


@pytest.mark.slow
def test_soak_thousands_of_steps_no_memory_growth():
    steps = 10_000
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = mfs.FusedSGD(mfs.step_decay(0.05, 0.99, 50), momentum=0.9, weight_decay=1e-4)
    x = mx.random.normal((8, 16))
    loss_and_grad = nn.value_and_grad(model, lambda m: (m(x) ** 2).mean())
    active = None
    for i in range(steps):
        _, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if i == 100:
            active = _settled_active_memory()
    growth = _settled_active_memory() - active
    # A leak of even one 4-byte array a step would add about 40 KB over these
    # 9,899 steps. A few scalars still held when synchronize() returns are
    # not growth (16 bytes, once, in a run under the sanitizers).
    assert growth < 1024, f"active memory grew by {growth} bytes in {steps - 101} steps"
    assert opt.state["step"].item() == steps
    for _, v in tree_flatten(model.parameters()):
        assert np.isfinite(np.array(v)).all()


# --------------------------------------------------------------------------
# The step counter stays exact; the schedule matches stock at huge steps
# --------------------------------------------------------------------------


@pytest.mark.parametrize("start", [2**24 - 3, 2**32 - 3, 2**53 - 3, 2**63 - 3])
def test_step_counter_is_exact_past_float_precision(start):
    opt = mfs.FusedSGD(mfs.step_decay(0.1, 0.9, 7), momentum=0.5)
    params = {"w": mx.ones((5,))}
    opt.init(params)
    opt.state["step"] = mx.array(np.uint64(start))
    for _ in range(6):
        params = opt.apply_gradients({"w": mx.ones((5,))}, params)
        mx.eval(params, opt.state)
    assert opt.state["step"].dtype == mx.uint64
    assert int(np.array(opt.state["step"])) == start + 6


@pytest.mark.parametrize("start", [2**31 - 3, 2**32 - 2, 2**40 + 1])
def test_learning_rate_past_2_31_steps_matches_stock(start):
    def run(cls, sched):
        opt = cls(sched(1.0, 0.9999, 3), momentum=0.9)
        params = {"w": mx.linspace(-1, 1, 33)}
        opt.init(params)
        opt.state["step"] = mx.array(np.uint64(start))
        for _ in range(8):
            params = opt.apply_gradients({"w": mx.full((33,), 0.25)}, params)
            mx.eval(params, opt.state)
        return params, opt

    pf, of = run(mfs.FusedSGD, mfs.step_decay)
    ps, os_ = run(optim.SGD, optim.step_decay)
    assert_bitwise_equal(pf["w"], ps["w"])
    assert_bitwise_equal(of.state["learning_rate"], os_.state["learning_rate"])
    assert_bitwise_equal(of.state["step"], os_.state["step"])


# --------------------------------------------------------------------------
# Checkpoint and resume in a fresh process
# --------------------------------------------------------------------------

TRAIN = r"""
import sys
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
import mlx_fused_sgd as mfs

mode, impl, folder, start, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
mx.random.seed(0)
model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
if impl == "fused":
    opt = mfs.FusedSGD(mfs.step_decay(0.1, 0.8, 4), momentum=0.9, weight_decay=1e-3)
else:
    opt = optim.SGD(optim.step_decay(0.1, 0.8, 4), momentum=0.9, weight_decay=1e-3)
if mode == "resume":
    model.update(tree_unflatten(list(mx.load(f"{folder}/params.safetensors").items())))
    opt.state = tree_unflatten(list(mx.load(f"{folder}/opt.safetensors").items()))
loss_and_grad = nn.value_and_grad(model, lambda m, x: (m(x) ** 2).mean())
for i in range(start, start + steps):
    x = mx.random.normal((8, 6), key=mx.random.key(i))
    _, grads = loss_and_grad(model, x)
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
out = "ckpt" if mode == "first" else "final"
mx.save_safetensors(f"{folder}/{out}_params.safetensors", dict(tree_flatten(model.parameters())))
mx.save_safetensors(f"{folder}/{out}_opt.safetensors", dict(tree_flatten(opt.state)))
"""


def _train(tmp_path, mode, impl, start, steps):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TRAIN,
            mode,
            impl,
            str(tmp_path),
            str(start),
            str(steps),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "first,second",
    [("fused", "fused"), ("stock", "fused"), ("fused", "stock")],
)
@pytest.mark.devices("cpu")
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, first, second):
    uninterrupted = tmp_path / "a"
    resumed = tmp_path / "b"
    uninterrupted.mkdir()
    resumed.mkdir()
    # Uninterrupted: 20 steps of `second` from a checkpoint of `first` at 10
    # is compared with 20 steps of `first`... both must equal stock's bits, so
    # compare against one straight run of `first`.
    _train(uninterrupted, "first", first, 0, 20)
    _train(resumed, "first", first, 0, 10)
    for name in ("params", "opt"):
        (resumed / f"{name}.safetensors").write_bytes(
            (resumed / f"ckpt_{name}.safetensors").read_bytes()
        )
    _train(resumed, "resume", second, 10, 10)
    for name in ("params", "opt"):
        a = mx.load(str(uninterrupted / f"ckpt_{name}.safetensors"))
        b = mx.load(str(resumed / f"final_{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert_bitwise_equal(b[k], a[k], f"{name} {k}")


def test_truncated_checkpoint_fails_to_load_and_changes_nothing(tmp_path):
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    params = {"w": mx.ones((64,))}
    opt.init(params)
    mx.save_safetensors(
        str(tmp_path / "opt.safetensors"), dict(tree_flatten(opt.state))
    )
    data = (tmp_path / "opt.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    before = dict(tree_flatten(opt.state))
    with pytest.raises((RuntimeError, ValueError)):
        opt.state = tree_unflatten(
            list(mx.load(str(tmp_path / "cut.safetensors")).items())
        )
    after = dict(tree_flatten(opt.state))
    assert after.keys() == before.keys()


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"step": mx.array(1.5)}, "step must be an integer scalar"),
        ({"step": mx.array([1, 2], mx.uint64)}, "step must be an integer scalar"),
        ({"learning_rate": mx.array([0.1, 0.2])}, "learning_rate must be a scalar"),
        ([1, 2], "state must be a dict"),
    ],
)
def test_malformed_state_is_refused_whole(bad, match):
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    opt.init({"w": mx.ones((3,))})
    before = dict(tree_flatten(opt.state))
    with pytest.raises(ValueError, match=match):
        opt.state = bad
    assert dict(tree_flatten(opt.state)).keys() == before.keys()


# --------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------


def _data(seed):
    key = mx.random.key(seed)
    k = mx.random.split(key, 4)
    params = {
        "a": mx.random.normal((300_000,), key=k[0]),
        "b": mx.random.normal((17,), key=k[1]),
    }
    grads = {
        "a": mx.random.normal((300_000,), key=k[2]),
        "b": mx.random.normal((17,), key=k[3]),
    }
    mx.eval(params, grads)
    return params, grads


def _run_optimizer(data, steps, stream=None):
    params, grads = data
    opt = mfs.FusedSGD(mfs.step_decay(0.1, 0.9, 3), momentum=0.9, nesterov=True)

    def body():
        nonlocal params
        for _ in range(steps):
            params = opt.apply_gradients(grads, params)
            mx.eval(params, opt.state)

    if stream is None:
        body()
    else:
        with mx.stream(stream):
            body()
    return params


def test_two_streams_match_sequential(device):
    data = [_data(1), _data(2)]
    expected = [_run_optimizer(d, 5) for d in data]
    dev = mx.gpu if device == "gpu" else mx.cpu
    streams = [mx.new_stream(dev), mx.new_stream(dev)]
    params = [d[0] for d in data]
    opts = [
        mfs.FusedSGD(mfs.step_decay(0.1, 0.9, 3), momentum=0.9, nesterov=True)
        for _ in data
    ]
    for _ in range(5):
        # Both optimizers' graphs, each on its own stream, evaluated together.
        for i in range(2):
            with mx.stream(streams[i]):
                params[i] = opts[i].apply_gradients(data[i][1], params[i])
        mx.eval(params, opts[0].state, opts[1].state)
    for got, exp in zip(params, expected):
        for k in exp:
            assert_bitwise_equal(got[k], exp[k], k)


@pytest.mark.devices("cpu")
def test_two_threads_match_sequential():
    data = [_data(1), _data(2)]
    expected = [_run_optimizer(d, 5) for d in data]
    results = [None, None]
    errors = []

    def worker(i):
        try:
            # MLX streams belong to a thread: each thread makes its own.
            results[i] = _run_optimizer(data[i], 5, mx.new_stream(mx.cpu))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, exp in zip(results, expected):
        for k in exp:
            assert_bitwise_equal(got[k], exp[k], k)
