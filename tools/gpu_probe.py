"""What a first run on a GPU must answer, in one short program.

1. **Parity**: FusedSGD on the GPU against FusedSGD on the CPU and against
   stock ``mlx.optimizers.SGD`` on the GPU, bit for bit, for float32,
   float16 and bfloat16 params (a transposed gradient among them, as
   ``nn.Linear`` gives), over option sets and three steps of a step-decay
   schedule (stock only in float32: its bits are the contract there; in
   half precision the CPU primitive is the reference).
2. **Where the outputs live**: the memory type CUDA reports
   (``cudaPointerGetAttributes``: device, host or managed) for a param and
   a momentum buffer the fused step wrote, donated and not, beside stock's
   output and a plain ``mx.zeros``.
3. **What the step costs**: per-step time of the fused step with its inputs
   donated and with them held (a fresh output every step), and how much of
   it the host spends before the GPU runs (``mx.async_eval``): a host-side
   time near the step's own means the step waits on a synchronous copy.

    python tools/gpu_probe.py --out probe.json [--device gpu] [--quick]

``--device cpu`` runs it all on the CPU (the CPU on both sides of the
parity check; CUDA, if it answers at all, knows none of the pointers): the
dry run of ``tools/gpu_check.sh`` uses it where there is no GPU. Exits 1
if any parity check differs.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

OPTION_SETS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-4},
]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _bits(a: mx.array) -> np.ndarray:
    host = np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)
    return host.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[host.itemsize])


def _model(dtype: mx.Dtype, seed: int) -> tuple[dict, dict]:
    """Params and gradients of the shapes a real model gives, the Linear
    weight's gradient a transposed view."""
    key = mx.random.key(seed)
    k = mx.random.split(key, 8)
    params = {
        "linear": {
            "weight": mx.random.normal((257, 129), key=k[0]),
            "bias": mx.random.normal((257,), key=k[1]),
        },
        "embedding": mx.random.normal(((1 << 20) + 3,), key=k[2]),
        "scalar": mx.random.normal((1,), key=k[3]),
    }
    grads = {
        "linear": {
            "weight": mx.random.normal((129, 257), key=k[4]).T,
            "bias": mx.random.normal((257,), key=k[5]),
        },
        "embedding": mx.random.normal(((1 << 20) + 3,), key=k[6]),
        "scalar": mx.random.normal((1,), key=k[7]),
    }
    cast = lambda t: {  # noqa: E731
        n: cast(v) if isinstance(v, dict) else v.astype(dtype) for n, v in t.items()
    }
    return cast(params), cast(grads)


def _leaves(tree: dict) -> dict[str, mx.array]:
    return dict(tree_flatten(tree))


def _train(make_opt, dtype: mx.Dtype, device: mx.Device) -> dict[str, mx.array]:
    with mx.stream(device):
        params, grads = _model(dtype, seed=0)
        opt = make_opt()
        for _ in range(3):
            params = opt.apply_gradients(grads, params)
            mx.eval(params, opt.state)
        state = {f"v.{k}": v for k, v in _leaves(opt.state).items() if v.ndim}
        return {**_leaves(params), **state}


def parity(gpu: mx.Device) -> list[dict]:
    rows = []
    for dname, dtype in DTYPES.items():
        for options in OPTION_SETS:

            def fused(options=options):
                return mfs.FusedSGD(mfs.step_decay(0.1, 0.5, 2), **options)

            def stock(options=options):
                return optim.SGD(optim.step_decay(0.1, 0.5, 2), **options)

            on_gpu = _train(fused, dtype, gpu)
            # Stock's bits are the contract in float32; in half precision
            # the kernels keep float32 internally (docs/guarantees.md), so
            # their reference there is the CPU primitive alone.
            against = {"fused cpu": _train(fused, dtype, mx.cpu)}
            if dtype == mx.float32:
                against["stock same device"] = _train(stock, dtype, gpu)
            for what, other in against.items():
                differ = {
                    k: int((_bits(v) != _bits(other[k])).sum())
                    for k, v in on_gpu.items()
                    if k in other
                }
                # Stock keeps a zero buffer even without momentum; FusedSGD
                # keeps none: only the arrays both keep are compared.
                only_one = sorted(set(on_gpu) ^ set(other))
                rows.append(
                    {
                        "dtype": dname,
                        "options": options,
                        "against": what,
                        "elements_differing": {k: n for k, n in differ.items() if n},
                        "compared": len(differ),
                        "kept_by_one_side_only": only_one,
                        "ok": bool(differ) and not any(differ.values()),
                    }
                )
    return rows


def _dlpack_pointer(a: mx.array) -> tuple[int, int]:
    """(data pointer, DLPack device type) of an evaluated array, read from
    its DLPack capsule (DLManagedTensor: data, device, ..., byte_offset)."""
    capsule = a.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    base = get(capsule, b"dltensor")
    data = ctypes.c_void_p.from_address(base).value or 0
    device_type = ctypes.c_int32.from_address(base + 8).value
    byte_offset = ctypes.c_uint64.from_address(base + 40).value
    return data + byte_offset, device_type


_MEMORY_TYPES = {0: "unregistered", 1: "host", 2: "device", 3: "managed"}


def _cudart():
    """A CUDA runtime library to ask about pointers (the driver answers
    for any runtime in the process)."""
    names = []
    for root in sys.path:
        names += glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so*"))
        names += glob.glob(os.path.join(root, "torch", "lib", "libcudart*.so*"))
    names += ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class _PointerAttributes(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("device", ctypes.c_int),
        ("devicePointer", ctypes.c_void_p),
        ("hostPointer", ctypes.c_void_p),
    ]


def memory_type(a: mx.array) -> dict:
    mx.eval(a)
    try:
        pointer, dl_device = _dlpack_pointer(a)
    except Exception as e:  # the answer is what was seen, failures included
        return {"error": f"DLPack: {type(e).__name__}: {e}"}
    found = {"pointer": hex(pointer), "dlpack_device_type": dl_device}
    cudart = _cudart()
    if cudart is None:
        found["error"] = "no CUDA runtime library found"
        return found
    attrs = _PointerAttributes()
    rc = cudart.cudaPointerGetAttributes(ctypes.byref(attrs), ctypes.c_void_p(pointer))
    found["cuda_rc"] = rc
    if rc == 0:
        found["type"] = _MEMORY_TYPES.get(attrs.type, str(attrs.type))
    return found


def memory(gpu: mx.Device) -> dict:
    with mx.stream(gpu):
        p, g, v = (mx.random.normal((1 << 20,)) for _ in range(3))
        mx.eval(p, g, v)
        held = mfs.sgd_update(p, g, v, learning_rate=0.1, momentum=0.9)
        mx.eval(held)
        found = {
            "fused param (inputs held)": memory_type(held[0]),
            "fused momentum buffer (inputs held)": memory_type(held[1]),
        }
        p2, g2, v2 = (mx.random.normal((1 << 20,)) for _ in range(3))
        mx.eval(p2, g2, v2)
        before = memory_type(p2).get("pointer")
        donated = mfs.sgd_update(p2, g2, v2, learning_rate=0.1, momentum=0.9)
        del p2, v2  # nothing else holds them: the step may write in place
        mx.eval(donated)
        found["fused param (inputs donated)"] = memory_type(donated[0])
        found["fused param (inputs donated)"]["wrote_in_place"] = (
            found["fused param (inputs donated)"].get("pointer") == before
        )
        kept = [p - 0.1 * g, mx.zeros((1 << 20,))]  # alive together: two buffers
        found["stock op output (p - lr * g)"] = memory_type(kept[0])
        found["mx.zeros"] = memory_type(kept[1])
        return found


def _median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 4)


def timing(device: mx.Device, n: int, steps: int) -> dict:
    """The fused step on ``n`` float32 elements in four tensors, with
    momentum: inputs donated vs held, and the host's share of each step."""
    names = [f"w{i}" for i in range(4)]
    results = {}
    with mx.stream(device):
        grads = {k: mx.random.normal((n // 4,)) for k in names}
        for mode in ("donated", "held", "stock"):
            params = {k: mx.random.normal((n // 4,)) for k in names}
            mx.eval(grads, params)
            if mode == "stock":
                opt = optim.SGD(learning_rate=0.01, momentum=0.9)
            else:
                opt = mfs.FusedSGD(learning_rate=0.01, momentum=0.9)
            held: list = []
            total, host = [], []
            for i in range(steps + 3):
                t0 = time.perf_counter()
                params = opt.apply_gradients(grads, params)
                mx.async_eval(params, opt.state)
                t1 = time.perf_counter()
                mx.eval(params, opt.state)
                t2 = time.perf_counter()
                if mode == "held":  # the next step's inputs stay referenced
                    held = [v for _, v in tree_flatten((params, opt.state))]
                if i >= 3:
                    total.append(t2 - t0)
                    host.append(t1 - t0)
            del held
            results[mode] = {"step_ms": _median_ms(total), "host_ms": _median_ms(host)}
    return {"elements": n, "dtype": "float32", "momentum": 0.9, **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps")
    args = parser.parse_args(argv)
    device = mx.gpu if args.device == "gpu" else mx.cpu
    if args.device == "gpu" and not mx.is_available(mx.gpu):
        print("gpu_probe: MLX has no GPU here", file=sys.stderr)
        return 2
    found: dict = {
        "mlx": mx.__version__,  # type: ignore[attr-defined]
        "mlx_fused_sgd": mfs.__version__,
        "backend_info": mfs.backend_info(),
        "python": platform.python_version(),
        "device": args.device,
    }
    if args.device == "gpu":
        found["device_info"] = {
            k: str(v)
            for k, v in mx.device_info().items()  # type: ignore[attr-defined]
        }
    found["parity"] = parity(device)
    found["memory"] = memory(device)
    sizes = [1 << 20] if args.quick else [1 << 20, 1 << 24, 1 << 27]
    steps = 3 if args.quick else 20
    found["timing"] = [timing(device, n, steps) for n in sizes]
    args.out.write_text(json.dumps(found, indent=1, default=str))
    bad = [r for r in found["parity"] if not r["ok"]]
    print(
        f"parity: {len(found['parity']) - len(bad)} of {len(found['parity'])} bit-equal"
    )
    for r in bad:
        print(f"  DIFFERS: {r}")
    for name, m in found.get("memory", {}).items():
        print(f"memory: {name}: {m}")
    for t in found["timing"]:
        print(f"timing: {t}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
