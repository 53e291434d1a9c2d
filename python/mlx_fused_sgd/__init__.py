"""mlx-fused-sgd: the SGD step with a step-decay schedule as one fused MLX op.

* :func:`step_decay` - drop-in for :func:`mlx.optimizers.step_decay`.
* :func:`sgd_update`, :func:`sgd_update_scheduled`, :func:`sgd_update_many`,
  :func:`sgd_update_many_scheduled` - the fused update as functions.
* :class:`FusedSGD` - drop-in for :class:`mlx.optimizers.SGD`.
* :func:`backend_info` - what runs on each device (fused kernels or fallback).
"""

import mlx.core as _mx

from ._build_info import MLX_BUILD_VERSION as _MLX_BUILD_VERSION

_MLX_VERSION: str = _mx.__version__  # type: ignore[attr-defined]  # not in the stubs

if _MLX_VERSION != _MLX_BUILD_VERSION:
    # An isolated rebuild (plain `pip install`) would pin the old MLX again:
    # the advice is to match the MLX, or rebuild against the installed one.
    raise ImportError(
        f"mlx_fused_sgd was built against MLX {_MLX_BUILD_VERSION} but MLX "
        f"{_MLX_VERSION} is installed; the extension must run with the MLX "
        "release it was compiled against. Either install that MLX:\n"
        f'    pip install "mlx=={_MLX_BUILD_VERSION}"\n'
        "or rebuild mlx-fused-sgd against the installed MLX, from its source "
        "directory, without build isolation (the build tools must then be in "
        "this environment):\n"
        "    pip install scikit-build-core cmake nanobind\n"
        "    pip install --no-build-isolation --no-deps --force-reinstall .\n"
        "(nanobind must be the release your MLX was built with: 3.1.0 for "
        "MLX 0.32.4)."
    )

from ._build_info import MLX_BUILD_CUDA as _MLX_BUILD_CUDA  # noqa: E402


def _mlx_is_cuda_build() -> bool:
    """Whether the installed MLX is its CUDA build (an mlx-cuda-* package
    supplies its library)."""
    from importlib import metadata

    return any(
        (d.metadata["Name"] or "").lower().replace("_", "-").startswith("mlx-cuda")
        for d in metadata.distributions()
    )


if _MLX_BUILD_CUDA and not _mlx_is_cuda_build():
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
