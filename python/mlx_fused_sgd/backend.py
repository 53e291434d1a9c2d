"""Which implementation runs on each device."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from . import _ext


def _gpu_available() -> tuple[bool, str | None]:
    if mx.metal.is_available():
        return True, "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return True, "cuda"
    return False, None


def backend_info() -> dict[str, dict[str, Any]]:
    """What the fused update runs on each device, for checking an install.

    Returns ``{"cpu": {...}, "gpu": {...}}``. Each entry has ``available``
    (the device exists in this MLX), ``kernels`` (``"fused"``: this
    package's kernels; ``"fallback"``: a composition of stock MLX ops with
    the same numbers, slower; ``None``: no such device) and ``reason`` (why
    the fallback, else ``None``). The CPU entry names the instruction set of
    its loop (``isa``); the GPU entry the GPU backend (``"metal"``,
    ``"cuda"``) and the Metal library (``library``).

    On a Mac the first call (or the first update on the GPU) loads the Metal
    library; if the OS refuses it, GPU updates use the fallback and a
    ``RuntimeWarning`` says why, once.
    """
    available, backend = _gpu_available()
    gpu: dict[str, Any] = {"available": available, "backend": backend}
    if available:
        status = _ext.gpu_kernel_status()
        gpu["kernels"] = "fused" if status["fused"] else "fallback"
        gpu["library"] = status["library"]
        gpu["reason"] = status["reason"]
    else:
        gpu.update(kernels=None, library=None, reason="this MLX has no GPU device")
    return {
        "cpu": {
            "available": True,
            "kernels": "fused",
            "isa": _ext.cpu_isa(),
            "reason": None,
        },
        "gpu": gpu,
    }
