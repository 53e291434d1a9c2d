"""Every compiled CPU loop (generic, AVX2, AVX-512) gives stock's bits."""

import os
import subprocess
import sys

import pytest

from mlx_fused_sgd import _ext

CHECK = r"""
import mlx.core as mx, mlx.optimizers as optim, numpy as np
import mlx_fused_sgd as mfs
from mlx_fused_sgd import _ext
print(_ext.cpu_isa())
cases = [dict(), dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.7, dampening=0.3),
         dict(momentum=0.9, nesterov=True, weight_decay=-1e-3)]
for kw in cases:
    for n in [1, 15, 16, 17, 100003, 300001]:  # tails, and chunks split across threads
        k = mx.random.split(mx.random.key(n), 3)
        p, g, v = (mx.random.normal((n,), key=kk) for kk in k)
        new_p, new_v = mfs.sgd_update(p, g, v, learning_rate=0.0371, **kw)
        opt = optim.SGD(0.0371, **kw); opt.init({"p": p}); opt.state["p"]["v"] = v
        ref = opt.apply_gradients({"p": g}, {"p": p})["p"]
        assert np.array_equal(np.array(new_p).view(np.uint32), np.array(ref).view(np.uint32)), (kw, n)
        if kw.get("momentum"):
            assert np.array_equal(np.array(new_v).view(np.uint32), np.array(opt.state["p"]["v"]).view(np.uint32)), (kw, n)
print("OK")
"""


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_each_isa_loop_is_bit_identical_to_stock(isa, device):
    if device != "cpu":
        pytest.skip("CPU loops")
    env = dict(os.environ, MLX_FUSED_SGD_CPU_ISA=isa)
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    used, verdict = proc.stdout.split()
    assert verdict == "OK"
    if used != isa:
        # Not compiled for this platform, or the CPU lacks it: say so.
        pytest.skip(f"{isa} loop not available here (ran {used})")


def test_cpu_isa_is_reported():
    assert _ext.cpu_isa() in ("generic", "avx2", "avx512")
