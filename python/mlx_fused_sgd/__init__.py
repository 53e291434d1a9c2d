"""mlx-fused-sgd: the SGD step with a step-decay schedule as one fused MLX op.

* :func:`step_decay` - drop-in for :func:`mlx.optimizers.step_decay`.
* :func:`sgd_update`, :func:`sgd_update_scheduled`, :func:`sgd_update_many`,
  :func:`sgd_update_many_scheduled` - the fused update as functions.
* :class:`FusedSGD` - drop-in for :class:`mlx.optimizers.SGD`.
* :func:`backend_info` - what runs on each device (fused kernels or fallback).
"""

import os as _os
import sys as _sys
from importlib import metadata as _metadata

import mlx.core as _mx

from ._build_info import MLX_BUILD_VERSION as _MLX_BUILD_VERSION

_MLX_VERSION: str = _mx.__version__  # type: ignore[attr-defined]  # not in the stubs


def _mlx_cuda_distribution() -> _metadata.Distribution | None:
    """The installed mlx-cuda-* package (MLX's CUDA build supplies its
    library), if any."""
    for dist in _metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("mlx-cuda"):
            return dist
    return None


def _replaced_mlx_library(dist: _metadata.Distribution) -> str | None:
    """The path of the MLX library that ``dist`` installed, if the file there
    is no longer its own: mlx-cpu and mlx-cuda-* install the same file, and
    the last one installed wins. Its recorded size tells them apart."""
    for file in dist.files or []:
        if file.name.startswith("libmlx.") and file.size is not None:
            path = str(file.locate())
            try:
                return None if _os.path.getsize(path) == file.size else path
            except OSError:
                return path
    return None


def _mlx_requirement(version: str) -> str:
    """The pip requirement for this MLX release with the installed backend:
    on Linux the backend's library comes from an extra (mlx[cpu] or
    mlx[cuda13]), and pinning plain mlx would leave the old library."""
    if not _sys.platform.startswith("linux"):
        return f"mlx=={version}"
    cuda = _mlx_cuda_distribution() is not None
    return f"mlx[{'cuda13' if cuda else 'cpu'}]=={version}"


if _MLX_VERSION != _MLX_BUILD_VERSION:
    # An isolated rebuild (plain `pip install`) would pin the old MLX again:
    # the advice is to match the MLX, or rebuild against the installed one.
    raise ImportError(
        f"mlx_fused_sgd was built against MLX {_MLX_BUILD_VERSION} but MLX "
        f"{_MLX_VERSION} is installed; the extension must run with the MLX "
        "release it was compiled against. Either install that MLX:\n"
        f'    pip install "{_mlx_requirement(_MLX_BUILD_VERSION)}"\n'
        "or rebuild mlx-fused-sgd against the installed MLX, from its source "
        "directory, without build isolation (the build tools must then be in "
        "this environment):\n"
        "    pip install scikit-build-core cmake nanobind\n"
        "    pip install --no-build-isolation --no-deps --force-reinstall .\n"
        "(nanobind must be the release your MLX was built with: 3.1.0 for "
        "MLX 0.32.4)."
    )

from ._build_info import MLX_BUILD_CUDA as _MLX_BUILD_CUDA  # noqa: E402

if _MLX_BUILD_CUDA:
    _mlx_cuda = _mlx_cuda_distribution()
    if _mlx_cuda is None:
        # The CUDA kernels call into MLX's CUDA backend: loading them with
        # another MLX would fail on missing symbols.
        raise ImportError(
            "mlx_fused_sgd was built with its CUDA kernels, against MLX's CUDA "
            f"build, but the installed MLX {_MLX_VERSION} is not that build. "
            "Either install it:\n"
            f'    pip install "mlx[cuda13]=={_MLX_BUILD_VERSION}"\n'
            "or rebuild mlx-fused-sgd against the installed MLX, from its source "
            "directory, without build isolation:\n"
            "    pip install --no-build-isolation --no-deps --force-reinstall ."
        )
    _replaced = _replaced_mlx_library(_mlx_cuda)
    if _replaced is not None:
        _name, _version = _mlx_cuda.metadata["Name"], _mlx_cuda.version
        raise ImportError(
            f"MLX's CUDA library {_replaced} is not the one {_name} installed: "
            "another MLX build replaced it (mlx-cpu writes the same file; a "
            "plain `pip install` of mlx-fused-sgd on Linux pulls it in), and "
            "MLX now runs without its GPU. Restore it:\n"
            "    pip uninstall mlx-cpu\n"
            f'    pip install --force-reinstall --no-deps "{_name}=={_version}"\n'
            "and install mlx-fused-sgd with --no-deps (README, 'On NVIDIA GPUs')."
        )

from . import _ext  # noqa: E402, F401  (the compiled module, for advanced use)
from .backend import backend_info  # noqa: E402
from .functional import (  # noqa: E402
    grad_norm,
    grads_nonfinite,
    sgd_update,
    sgd_update_many,
    sgd_update_many_scheduled,
    sgd_update_scheduled,
)
from .optimizer import FusedSGD  # noqa: E402
from .schedules import StepDecay, step_decay  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "FusedSGD",
    "StepDecay",
    "backend_info",
    "grad_norm",
    "grads_nonfinite",
    "sgd_update",
    "sgd_update_many",
    "sgd_update_many_scheduled",
    "sgd_update_scheduled",
    "step_decay",
]
