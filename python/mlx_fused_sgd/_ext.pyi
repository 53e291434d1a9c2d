"""C++ MLX primitives of mlx_fused_sgd (step decay, fused SGD)."""

from collections.abc import Sequence
from typing import Any

import mlx.core


mlx_build_version: str = '0.32.4'

DEFAULT_TENSORS_PER_PRIMITIVE: int = 4

def cpu_isa() -> str:
    """
    The instruction set of the CPU update loop in use: 'generic', 'avx2' or 'avx512' (MLX_FUSED_SGD_CPU_ISA overrides the CPUID choice).
    """

def gpu_kernel_status() -> dict:
    """
    Whether GPU streams run this package's kernels ('fused'), the metallib ('library') and why not ('reason'); decided once, loading the metallib.
    """

def validate_step_decay(init: float, decay_rate: float, step_size: int) -> None:
    """Raise ValueError naming the first invalid step-decay number."""

def step_decay_lr(step: mlx.core.array, init: float, decay_rate: float, step_size: int, *, stream: mlx.core.Stream | mlx.core.Device | None = None) -> mlx.core.array:
    """
    Step-decay learning rate of an integer step array, as one primitive.

    Computes ``float32(init) * float32(decay_rate) ** float32(step // step_size)``
    for every element of ``step``, bit-identical to
    ``mlx.optimizers.step_decay(init, decay_rate, step_size)(step)`` on the CPU.

    Args:
        step (array): Integer array of steps, any shape.
        init (float): Initial value.
        decay_rate (float): Multiplicative factor to decay by.
        step_size (int): Decay every ``step_size`` steps (>= 1).
        stream (Stream or Device, optional): Where to run the op.

    Returns:
        array: float32 learning rates of ``step``'s shape.
    """

def grads_nonfinite(grads: list[mlx.core.array], *, tensors_per_primitive: int = 1024, stream: mlx.core.Stream | mlx.core.Device | None = None) -> mlx.core.array:
    """
    A boolean scalar, on the device: True when any element of any gradient
    is NaN or Inf. Pass it as ``skip`` to the update functions to make a step a
    no-op without a host round trip (what ``FusedSGD(skip_nonfinite=True)``
    does).
    """

def grads_sq_norm(grads: list[mlx.core.array], *, tensors_per_primitive: int = 1024, stream: mlx.core.Stream | mlx.core.Device | None = None) -> mlx.core.array:
    """
    The squared L2 norm of all gradients together, a float32 scalar on
    the device (per tensor summed in double and rounded, then added in order).
    """

class SGDSettings:
    """
    Every option of one update (the hyperparameters as Python floats, the device scalars, the half-precision storage options), as keywords and attributes; validate() raises ValueError naming the first bad hyperparameter.
    """

    def __init__(self, *, momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0, nesterov: bool = False, maximize: bool = False, grad_scale: mlx.core.array | None = None, skip: mlx.core.array | None = None, clip_factor: mlx.core.array | None = None, master_params: list[mlx.core.array | None] = [], rounding_seed: int | None = None, rounding_step: mlx.core.array | None = None) -> None: ...

    def validate(self) -> None: ...

    @property
    def momentum(self) -> float: ...

    @momentum.setter
    def momentum(self, arg: float, /) -> None: ...

    @property
    def weight_decay(self) -> float: ...

    @weight_decay.setter
    def weight_decay(self, arg: float, /) -> None: ...

    @property
    def dampening(self) -> float: ...

    @dampening.setter
    def dampening(self, arg: float, /) -> None: ...

    @property
    def nesterov(self) -> bool: ...

    @nesterov.setter
    def nesterov(self, arg: bool, /) -> None: ...

    @property
    def maximize(self) -> bool: ...

    @maximize.setter
    def maximize(self, arg: bool, /) -> None: ...

    @property
    def grad_scale(self) -> mlx.core.array | None: ...

    @grad_scale.setter
    def grad_scale(self, arg: mlx.core.array | None, /) -> None: ...

    @property
    def skip(self) -> mlx.core.array | None: ...

    @skip.setter
    def skip(self, arg: mlx.core.array | None, /) -> None: ...

    @property
    def clip_factor(self) -> mlx.core.array | None: ...

    @clip_factor.setter
    def clip_factor(self, arg: mlx.core.array | None, /) -> None: ...

    @property
    def master_params(self) -> list[mlx.core.array | None]: ...

    @master_params.setter
    def master_params(self, arg: Sequence[mlx.core.array | None], /) -> None: ...

    @property
    def rounding_seed(self) -> int | None: ...

    @rounding_seed.setter
    def rounding_seed(self, arg: int | None, /) -> None: ...

    @property
    def rounding_step(self) -> mlx.core.array | None: ...

    @rounding_step.setter
    def rounding_step(self, arg: mlx.core.array | None, /) -> None: ...

def sgd_update(params: list[mlx.core.array], grads: list[mlx.core.array], velocities: list[mlx.core.array], settings: SGDSettings, *, learning_rate: mlx.core.array | None = None, step: mlx.core.array | None = None, schedule: tuple[float, float, int] | None = None, tensors_per_primitive: int = 4, fallback: bool = False, stream: mlx.core.Stream | mlx.core.Device | None = None) -> tuple[list[mlx.core.array], list[mlx.core.array], list[mlx.core.array | None]]:
    """
    The fused SGD step of many tensors: grouped by dtype, chunked into
    primitives of ``tensors_per_primitive`` tensors each. The learning rate is
    ``learning_rate`` (a scalar array), or the step-decay ``schedule`` (init,
    decay_rate, step_size) of the integer ``step`` counter, computed in the
    kernel. ``fallback`` composes the update of stock MLX ops instead (for
    tests). Returns the new params, the new momentum buffers (the given ones
    when momentum is 0) and the new master copies (None where a param has
    none).
    """

def collect_tree(grads: object, params: object, state: object | None, state_key: str | None = None) -> tuple[list[mlx.core.array], list[mlx.core.array], list[dict], list[mlx.core.array]] | None:
    """
    The leaves of ``grads`` with their ``params``, per-parameter ``state`` dicts (``state`` None: none) and each one's ``state_key`` entry, as four lists; None where the Python walk must run (a mismatch, to raise its error; a namedtuple; an array subclass; a missing entry).
    """

def rebuild_tree(grads: object, leaves: list[mlx.core.array]) -> Any:
    """
    A tree shaped like ``grads`` holding ``leaves`` in order (dicts come back as plain dicts, as tree_map builds them); None where the Python rebuild must run (a namedtuple, an array subclass).
    """

def set_state_items(states: list[dict], key: str, values: Sequence[mlx.core.array | None]) -> None:
    """``states[i][key] = values[i]`` for every i whose value is not None."""
