"""Every compiled CPU loop (generic, AVX2, AVX-512) gives stock's bits."""

import os
import subprocess
import sys

import pytest

from mlx_fused_sgd import _ext

# Once, on the CPU: the CPU loops.
pytestmark = pytest.mark.devices("cpu")


CHECK = r"""
import hashlib
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

# Half params: the float32 step rounded once by MLX's conversion (momentum in
# the half type or in float32), NaN, Inf, subnormals and overflow included;
# stochastic rounding and master weights add a digest of their bits, which
# must be the generic loop's.
bits = lambda a: np.array(a.view(mx.uint16 if a.dtype != mx.float32 else mx.uint32))
digest = hashlib.sha256()
for half in (mx.bfloat16, mx.float16):
    for kw in cases:
        for n in [1, 17, 100003, 300001]:
            k = mx.random.split(mx.random.key(n + 7), 3)
            p32, g32, v32 = (mx.random.normal((n,), key=kk) for kk in k)
            if n > 1:
                p32[3] = float("nan"); g32[5] = float("inf")
            if n > 100:
                p32[10:20] = p32[10:20] * 1e-6  # float16 subnormals
                p32[20:30] = p32[20:30] * 7e4  # past float16's range
            p, g = p32.astype(half), g32.astype(half)
            for state in (half, mx.float32):
                v = v32.astype(state)
                new_p, new_v = mfs.sgd_update(p, g, v, learning_rate=0.0371, **kw)
                ref_p, ref_v = mfs.sgd_update(p.astype(mx.float32), g.astype(mx.float32), v.astype(mx.float32), learning_rate=0.0371, **kw)
                assert np.array_equal(bits(new_p), bits(ref_p.astype(half))), (half, kw, n, state)
                if kw.get("momentum"):
                    assert new_v.dtype == state
                    assert np.array_equal(bits(new_v), bits(ref_v.astype(state))), (half, kw, n, state)
                mw = mfs.sgd_update_many([p], [g], [v], learning_rate=0.0371, master_params=[p32], **kw)
                outs = [mw[0][0], mw[2][0], *mw[1]]
                if half == mx.bfloat16:
                    outs.append(mfs.sgd_update_many([p], [g], [v], learning_rate=0.0371, rounding_seed=n, rounding_step=3, **kw)[0][0])
                for a in outs:
                    digest.update(bits(a).tobytes())
# The gradient reads (max_grad_norm, skip_nonfinite) of every dtype.
for dtype in (mx.float32, mx.bfloat16, mx.float16):
    gs = [mx.random.normal((n,), key=mx.random.key(n)).astype(dtype) for n in (5, 100003, 300001)]
    digest.update(np.array(_ext.grads_sq_norm(gs)).tobytes())
    assert not _ext.grads_nonfinite(gs).item()
    gs[1][77] = float("inf")
    assert _ext.grads_nonfinite(gs).item()
print("OK", digest.hexdigest())
"""


def _check(isa: str) -> tuple[str, str]:
    """Run CHECK with the loop of `isa`; return (the loop used, the digest)."""
    env = dict(os.environ, MLX_FUSED_SGD_CPU_ISA=isa)
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    used, verdict, digest = proc.stdout.split()
    assert verdict == "OK"
    return used, digest


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_each_isa_loop_is_bit_identical_to_stock(isa):
    used, digest = _check(isa)
    if isa != "generic":
        assert digest == _check("generic")[1], "half-precision bits differ"
    if used != isa:
        # Not compiled for this platform, or the CPU lacks it: say so.
        pytest.skip(f"{isa} loop not available here (ran {used})")


def test_cpu_isa_is_reported():
    assert _ext.cpu_isa() in ("generic", "avx2", "avx512")
