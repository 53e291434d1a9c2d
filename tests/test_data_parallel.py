"""Data-parallel training over mx.distributed: two processes on this machine
(MLX's ring backend over loopback, started by ``mlx.launch``) run the shipped
example; their params must be identical, and match one process training on
the combined batch.

Tolerance against the combined batch: each rank's gradient is of its shard's
mean loss and the two are averaged, where the single process sums all rows at
once; the float32 sums run in a different order, so gradients differ by a few
ulp (relative ~1e-7 each) and the params after a few steps of lr <= 0.1 by far
less than 1e-5. Against a single process that averages the per-shard
gradients itself the result is bit-identical: for two ranks ``all_sum`` is one
commutative float32 addition, so the distributed plumbing adds no error."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_fused_sgd as mfs
from mlx_fused_sgd.examples import data_parallel as dp

from helpers import assert_bitwise_equal

STEPS, BATCH = 6, 32


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    pytest.fail("no two consecutive free ports on loopback")


def _launch(tmp_path, max_grad_norm):
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
    assert launcher, "mlx.launch (installed with mlx) not found next to python"
    cmd = [
        launcher,
        "--backend",
        "ring",
        "-n",
        "2",
        "--starting-port",
        str(_free_port_pair()),
        sys.executable,
        "-m",
        "mlx_fused_sgd.examples.data_parallel",
        "--steps",
        str(STEPS),
        "--batch-size",
        str(BATCH),
        "--out",
        str(tmp_path),
    ]
    if max_grad_norm is not None:
        cmd += ["--max-grad-norm", str(max_grad_norm)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rank 0/2" in proc.stdout and "rank 1/2" in proc.stdout, proc.stdout
    return [mx.load(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]


def _single_process(max_grad_norm, combined: bool):
    """One process: gradients of the combined batch (combined=True), or the
    mean of the two shards' gradients computed here."""
    model = dp.make_model()
    optimizer = dp.make_optimizer(max_grad_norm)
    loss_and_grad = nn.value_and_grad(model, dp.loss_fn)
    for step in range(STEPS):
        x, y = dp.batch(step, BATCH)
        if combined:
            _, grads = loss_and_grad(model, x, y)
        else:
            shards = [
                loss_and_grad(model, dp.shard(x, r, 2), dp.shard(y, r, 2))[1]
                for r in range(2)
            ]
            flat = [dict(tree_flatten(g)) for g in shards]
            grads = {k: (flat[0][k] + flat[1][k]) / 2 for k in flat[0]}
            grads = tree_unflatten(list(grads.items()))
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    out = dict(tree_flatten(model.parameters()))
    if optimizer.last_grad_norm is not None:
        out["last_grad_norm"] = optimizer.last_grad_norm
    return out


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["plain", "clipped"])
def test_two_ranks_stay_identical_and_match_one_process(tmp_path, max_grad_norm):
    ranks = _launch(tmp_path, max_grad_norm)
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        assert_bitwise_equal(ranks[0][k], ranks[1][k], f"rank 0 vs 1: {k}")

    averaged = _single_process(max_grad_norm, combined=False)
    assert averaged.keys() == ranks[0].keys()
    for k in averaged:
        assert_bitwise_equal(ranks[0][k], averaged[k], f"vs averaged shards: {k}")

    combined = _single_process(max_grad_norm, combined=True)
    initial = dict(tree_flatten(dp.make_model().parameters()))
    for k in combined:
        got, want = np.array(ranks[0][k]), np.array(combined[k])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=k)
        if k in initial:
            # Training moved the params (so the comparison is not vacuous).
            assert not np.array_equal(want, np.array(initial[k])), k

    if max_grad_norm is not None:
        # Clipping used the global norm: above the limit, and the same on
        # both ranks (checked above) as in the combined-batch run.
        norm = ranks[0]["last_grad_norm"].item()
        assert norm > max_grad_norm
        assert norm == pytest.approx(combined["last_grad_norm"].item(), rel=1e-5)


def test_example_runs_in_one_process():
    """Without the launcher the example trains alone (a group of size 1)."""
    model, optimizer = dp.train(2, 8, None, mx.distributed.init())
    assert optimizer.state["step"].item() == 2
    with pytest.raises(ValueError, match="batch_size"):
        dp.train(1, 7, None, _FakeGroup())
    assert isinstance(optimizer, mfs.FusedSGD)
    assert isinstance(model, dp.Classifier)


class _FakeGroup:
    def rank(self):
        return 0

    def size(self):
        return 2
