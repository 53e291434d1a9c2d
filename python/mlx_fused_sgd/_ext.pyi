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

def validate_sgd_settings(momentum: float, weight_decay: float, dampening: float, nesterov: bool) -> None:
    """Raise ValueError naming the first invalid SGD hyperparameter."""

def sgd_update(param: mlx.core.array, grad: mlx.core.array, velocity: mlx.core.array | None = None, *, learning_rate: mlx.core.array, momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0, nesterov: bool = False, maximize: bool = False, grad_scale: mlx.core.array | None = None, skip: mlx.core.array | None = None, clip_factor: mlx.core.array | None = None, stream: mlx.core.Stream | mlx.core.Device | None = None) -> tuple[mlx.core.array, mlx.core.array | None]:
    """
    One fused SGD step of one tensor (one primitive, one pass).

    Returns ``(new_param, new_velocity)``; ``new_velocity`` is ``velocity``
    unchanged when momentum is 0. ``learning_rate`` is a scalar array.
    """

def sgd_update_scheduled(param: mlx.core.array, grad: mlx.core.array, velocity: mlx.core.array | None = None, *, step: mlx.core.array, init: float, decay_rate: float, step_size: int, momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0, nesterov: bool = False, maximize: bool = False, grad_scale: mlx.core.array | None = None, skip: mlx.core.array | None = None, clip_factor: mlx.core.array | None = None, stream: mlx.core.Stream | mlx.core.Device | None = None) -> tuple[mlx.core.array, mlx.core.array | None]:
    """
    One fused SGD step with the step-decay learning rate computed in the
    kernel from the integer ``step`` counter (the step *before* increment).
    """

def sgd_update_many(params: list[mlx.core.array], grads: list[mlx.core.array], velocities: list[mlx.core.array], *, learning_rate: mlx.core.array, momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0, nesterov: bool = False, maximize: bool = False, grad_scale: mlx.core.array | None = None, skip: mlx.core.array | None = None, clip_factor: mlx.core.array | None = None, master_params: list[mlx.core.array | None] | None = None, rounding_seed: int | None = None, rounding_step: mlx.core.array | None = None, tensors_per_primitive: int = 4, stream: mlx.core.Stream | mlx.core.Device | None = None) -> tuple[list[mlx.core.array], list[mlx.core.array], list[mlx.core.array | None]]:
    """
    Fused SGD step of many tensors: grouped by dtype, chunked into
    primitives of ``tensors_per_primitive`` tensors each.
    """

def sgd_update_many_scheduled(params: list[mlx.core.array], grads: list[mlx.core.array], velocities: list[mlx.core.array], *, step: mlx.core.array, init: float, decay_rate: float, step_size: int, momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0, nesterov: bool = False, maximize: bool = False, grad_scale: mlx.core.array | None = None, skip: mlx.core.array | None = None, clip_factor: mlx.core.array | None = None, master_params: list[mlx.core.array | None] | None = None, rounding_seed: int | None = None, rounding_step: mlx.core.array | None = None, tensors_per_primitive: int = 4, stream: mlx.core.Stream | mlx.core.Device | None = None) -> tuple[list[mlx.core.array], list[mlx.core.array], list[mlx.core.array | None]]:
    """
    Fused SGD step of many tensors with the step-decay learning rate
    computed in the kernel from the integer ``step`` counter.
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
