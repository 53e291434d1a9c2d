"""The fused SGD update as functions (thin wrappers over the C++ ops)."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

import mlx.core as mx
from mlx.utils import tree_flatten

from . import _ext
from .schedules import StepDecay

StreamOrDevice = mx.Stream | mx.Device | None

if TYPE_CHECKING:
    from typing_extensions import TypedDict, Unpack

    class _UpdateOptions(TypedDict, total=False):
        """The keyword arguments the many-tensor updates share (for the
        overloads that type their results)."""

        momentum: float
        weight_decay: float
        dampening: float
        nesterov: bool
        maximize: bool
        grad_scale: float | mx.array | None
        skip: mx.array | None
        max_grad_norm: float | None
        clip_factor: mx.array | None
        rounding_seed: int | None
        rounding_step: mx.array | int | None
        tensors_per_primitive: int
        stream: StreamOrDevice


_Pair = tuple[list[mx.array], list[mx.array]]
_Triple = tuple[list[mx.array], list[mx.array], list[mx.array | None]]


def as_float32(x: float, name: str) -> float:
    """``x`` rounded to float32, as the kernels use it; a ValueError naming
    ``name`` when that overflows (the kernel would compute with inf)."""
    x = float(x)
    try:
        rounded = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        rounded = math.inf
    if math.isfinite(x) and not math.isfinite(rounded):
        raise ValueError(
            f"{name} must fit in float32 (the kernels compute in float32), "
            f"but got {x!r}."
        )
    return rounded


def check_learning_rate(learning_rate: float) -> float:
    """A Python learning rate as the float32 the kernels use; a ValueError
    when it overflows float32 or is not finite."""
    lr = as_float32(learning_rate, "learning_rate")
    if not math.isfinite(lr):
        raise ValueError(f"learning_rate must be finite, but got {learning_rate}.")
    return lr


def _as_lr(learning_rate: float | mx.array) -> mx.array:
    if isinstance(learning_rate, mx.array):
        return learning_rate
    if isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
        return mx.array(check_learning_rate(learning_rate), mx.float32)
    raise TypeError(
        "learning_rate must be a float or a scalar mx.array, but got "
        f"{type(learning_rate).__name__}."
    )


def as_grad_scale(grad_scale: float | mx.array | None) -> mx.array | None:
    """``grad_scale`` as the float32 scalar array the kernels divide by."""
    if grad_scale is None or isinstance(grad_scale, mx.array):
        return grad_scale
    if isinstance(grad_scale, (int, float)) and not isinstance(grad_scale, bool):
        scale = as_float32(grad_scale, "grad_scale")
        if not math.isfinite(scale) or scale == 0:
            raise ValueError(
                "grad_scale must be a finite nonzero number in float32 (the "
                f"kernels divide by it in float32), but got {grad_scale}"
                + (" (0 in float32)." if scale == 0 and grad_scale != 0 else ".")
            )
        return mx.array(scale, mx.float32)
    raise TypeError(
        "grad_scale must be a float, a scalar mx.array or None, but got "
        f"{type(grad_scale).__name__}."
    )


def _leaves(grads: Any) -> list[mx.array]:
    """The arrays of a sequence of arrays or of a gradient tree."""
    if isinstance(grads, (list, tuple)) and all(type(g) is mx.array for g in grads):
        return list(grads)
    # (mlx.utils' stub types tree_flatten's result loosely)
    return [g for _, g in tree_flatten(grads)]  # type: ignore[misc, str-unpack]


def grad_norm(grads: Any, grad_scale: float | mx.array | None = None) -> mx.array:
    """The global L2 norm of ``grads`` (a sequence of arrays or a gradient
    tree), divided by ``grad_scale``: a float32 scalar computed on the device
    without an op per tensor."""
    norm = mx.sqrt(_ext.grads_sq_norm(_leaves(grads)))
    scale = as_grad_scale(grad_scale)
    return norm if scale is None else norm / scale


def clip_factor_for(norm: mx.array, max_grad_norm: float) -> mx.array:
    """``min(max_grad_norm / (norm + 1e-6), 1)``, as optim.clip_grad_norm."""
    return mx.minimum(max_grad_norm / (norm + 1e-6), 1.0)


def check_max_grad_norm(max_grad_norm: float | None) -> float | None:
    if max_grad_norm is None:
        return None
    if (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not math.isfinite(max_grad_norm)
        or max_grad_norm <= 0
    ):
        raise ValueError(
            f"max_grad_norm must be a finite number > 0, but got {max_grad_norm!r}."
        )
    return float(max_grad_norm)


def _clip(
    clip_factor: mx.array | None,
    max_grad_norm: float | None,
    grads: Sequence[mx.array],
    grad_scale: float | mx.array | None,
) -> mx.array | None:
    max_grad_norm = check_max_grad_norm(max_grad_norm)
    if max_grad_norm is None:
        return clip_factor
    if clip_factor is not None:
        raise ValueError("pass max_grad_norm or clip_factor, not both.")
    return clip_factor_for(grad_norm(grads, grad_scale), max_grad_norm)


def check_rounding_seed(seed: int | None, allow_none: bool = True) -> int | None:
    """The stochastic-rounding seed, checked: an integer in [0, 2**64)."""
    if seed is None and allow_none:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(
            f"rounding_seed must be an integer in [0, 2**64), but got {seed!r}."
        )
    return seed


def _as_step(step: mx.array | int | None) -> mx.array | None:
    if step is None or isinstance(step, mx.array):
        return step
    if isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**64:
        # Two 32-bit halves: MLX converts Python ints through int64, so a
        # step of 2**63 or more cannot be given to mx.array directly.
        high = mx.array(step >> 32, mx.uint64)
        low = mx.array(step & 0xFFFFFFFF, mx.uint64)
        return (high << mx.array(32, mx.uint64)) | low
    raise TypeError(
        "rounding_step must be an int in [0, 2**64) or an integer scalar "
        f"mx.array, but got {step!r}."
    )


def sgd_settings(
    grads: Sequence[mx.array],
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: float | mx.array | None = None,
    skip: mx.array | None = None,
    max_grad_norm: float | None = None,
    clip_factor: mx.array | None = None,
    master_params: Sequence[mx.array | None] | None = None,
    rounding_seed: int | None = None,
    rounding_step: mx.array | int | None = None,
) -> _ext.SGDSettings:
    """Every option of an update as the one value the extension takes,
    checked (``max_grad_norm`` becomes the clip factor of ``grads``)."""
    return _ext.SGDSettings(
        momentum=float(momentum),
        weight_decay=float(weight_decay),
        dampening=float(dampening),
        nesterov=bool(nesterov),
        maximize=bool(maximize),
        grad_scale=as_grad_scale(grad_scale),
        skip=skip,
        clip_factor=_clip(clip_factor, max_grad_norm, grads, grad_scale),
        master_params=[] if master_params is None else list(master_params),
        rounding_seed=check_rounding_seed(rounding_seed),
        rounding_step=_as_step(rounding_step),
    )


def apply_update(
    params: Sequence[mx.array],
    grads: Sequence[mx.array],
    velocities: Sequence[mx.array] | None,
    options: _ext.SGDSettings,
    *,
    learning_rate: float | mx.array | None = None,
    step: mx.array | None = None,
    schedule: StepDecay | None = None,
    tensors_per_primitive: int = _ext.DEFAULT_TENSORS_PER_PRIMITIVE,
    fallback: bool = False,
    stream: StreamOrDevice = None,
) -> tuple[list[mx.array], list[mx.array], list[mx.array | None]]:
    """The extension's update: ``learning_rate``, or ``step`` with a
    step-decay ``schedule`` evaluated in the kernel. Returns the new params,
    momentum buffers and master copies."""
    if schedule is not None:
        s = _check_schedule(schedule)
        lr: dict[str, Any] = {
            "step": step,
            "schedule": (float(s.init), float(s.decay_rate), s.step_size),
        }
    elif learning_rate is None:
        raise TypeError("pass learning_rate, or step and schedule.")
    else:
        lr = {"learning_rate": _as_lr(learning_rate)}
    return _ext.sgd_update(
        list(params),
        list(grads),
        list(velocities or []),
        options,
        **lr,
        tensors_per_primitive=tensors_per_primitive,
        fallback=fallback,
        stream=stream,
    )


def _many_result(out: tuple, master_params: Sequence | None) -> tuple:
    """The extension's (params, velocities, masters), without the masters
    when none were given."""
    new_params, new_velocities, new_masters = out
    if master_params is None:
        return new_params, new_velocities
    return new_params, new_velocities, new_masters


def _check_schedule(schedule: StepDecay) -> StepDecay:
    if not isinstance(schedule, StepDecay):
        raise TypeError(
            "schedule must be a mlx_fused_sgd.step_decay(...) schedule, but got "
            f"{type(schedule).__name__}; pass other schedules' values as "
            "learning_rate."
        )
    return schedule


def grads_nonfinite(
    grads: Any,
    *,
    tensors_per_primitive: int = 1024,
    stream: StreamOrDevice = None,
) -> mx.array:
    """A boolean scalar, computed on the device: True when any element of any
    gradient (a sequence of arrays or a gradient tree) is NaN or Inf. Pass it
    as ``skip`` to the update functions to make a step a no-op without
    reading it back to the host."""
    return _ext.grads_nonfinite(
        _leaves(grads), tensors_per_primitive=tensors_per_primitive, stream=stream
    )


def sgd_update(
    param: mx.array,
    grad: mx.array,
    velocity: mx.array | None = None,
    *,
    learning_rate: float | mx.array,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: float | mx.array | None = None,
    skip: mx.array | None = None,
    max_grad_norm: float | None = None,
    clip_factor: mx.array | None = None,
    stream: StreamOrDevice = None,
) -> tuple[mx.array, mx.array | None]:
    """One fused SGD step of one tensor, as ``mlx.optimizers.SGD`` computes it.

    One primitive reads ``param``, ``grad`` and ``velocity`` once and writes
    the new param and the new velocity.

    Args:
        param: The parameter (float32, float16 or bfloat16).
        grad: Its gradient: same shape or broadcastable to it, and the
            param's dtype, or float16/bfloat16 for a float32 param (then,
            without weight decay, the update is computed in the gradient's
            dtype with stock's own ops, as stock computes it, not fused).
        velocity: The momentum buffer (``None`` means zeros). Ignored and
            returned unchanged when ``momentum`` is 0.
        learning_rate: A float or a scalar array.
        momentum, weight_decay, dampening, nesterov: As ``optim.SGD``.
        maximize: Step up the gradient (PyTorch's meaning: it is negated
            before weight decay).
        grad_scale: Loss scale: the gradient is divided by it first, inside
            the kernel (a float, or a scalar array kept on the device).
        skip: A boolean scalar array (see :func:`grads_nonfinite`); when
            true on the device, the outputs are the inputs unchanged.
        max_grad_norm: Clip the gradients (all of them together, after
            unscaling) to this global L2 norm, inside the kernel:
            ``g * min(max_grad_norm / (norm + 1e-6), 1)`` as
            ``optim.clip_grad_norm`` computes it.
        clip_factor: The multiplier itself, a float32 scalar array (what
            ``max_grad_norm`` computes); not both.
        stream: Stream or device to run on.

    Returns:
        ``(new_param, new_velocity)``.
    """
    new_params, new_velocities = sgd_update_many(
        [param],
        [grad],
        None if velocity is None else [velocity],
        learning_rate=learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        grad_scale=grad_scale,
        skip=skip,
        max_grad_norm=max_grad_norm,
        clip_factor=clip_factor,
        tensors_per_primitive=1,
        stream=stream,
    )
    return new_params[0], new_velocities[0] if new_velocities else None


def sgd_update_scheduled(
    param: mx.array,
    grad: mx.array,
    velocity: mx.array | None = None,
    *,
    step: mx.array,
    schedule: StepDecay,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: float | mx.array | None = None,
    skip: mx.array | None = None,
    max_grad_norm: float | None = None,
    clip_factor: mx.array | None = None,
    stream: StreamOrDevice = None,
) -> tuple[mx.array, mx.array | None]:
    """:func:`sgd_update` with the learning rate ``schedule(step)`` computed
    inside the kernel from the integer step counter (the step before it is
    incremented, as stock optimizers evaluate schedules)."""
    new_params, new_velocities = sgd_update_many_scheduled(
        [param],
        [grad],
        None if velocity is None else [velocity],
        step=step,
        schedule=schedule,
        momentum=momentum,
        weight_decay=weight_decay,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        grad_scale=grad_scale,
        skip=skip,
        max_grad_norm=max_grad_norm,
        clip_factor=clip_factor,
        tensors_per_primitive=1,
        stream=stream,
    )
    return new_params[0], new_velocities[0] if new_velocities else None


@overload
def sgd_update_many(
    params: Sequence[mx.array],
    grads: Sequence[mx.array],
    velocities: Sequence[mx.array] | None = None,
    *,
    learning_rate: float | mx.array,
    master_params: None = None,
    **options: Unpack[_UpdateOptions],
) -> _Pair: ...


@overload
def sgd_update_many(
    params: Sequence[mx.array],
    grads: Sequence[mx.array],
    velocities: Sequence[mx.array] | None = None,
    *,
    learning_rate: float | mx.array,
    master_params: Sequence[mx.array | None],
    **options: Unpack[_UpdateOptions],
) -> _Triple: ...


def sgd_update_many(
    params: Sequence[mx.array],
    grads: Sequence[mx.array],
    velocities: Sequence[mx.array] | None = None,
    *,
    learning_rate: float | mx.array,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: float | mx.array | None = None,
    skip: mx.array | None = None,
    max_grad_norm: float | None = None,
    clip_factor: mx.array | None = None,
    master_params: Sequence[mx.array | None] | None = None,
    rounding_seed: int | None = None,
    rounding_step: mx.array | int | None = None,
    tensors_per_primitive: int = _ext.DEFAULT_TENSORS_PER_PRIMITIVE,
    stream: StreamOrDevice = None,
) -> _Pair | _Triple:
    """The fused SGD step of many tensors, in few primitives.

    Tensors are grouped by dtype and packed ``tensors_per_primitive`` to a
    primitive. The arguments are :func:`sgd_update`'s, and two ways to store
    float16/bfloat16 params without losing small updates:

    Args:
        master_params: One entry per param: a float32 master copy for a
            float16/bfloat16 param (the kernel updates the copy in place of
            the param and writes the param as its rounding), ``None`` for a
            param without one.
        rounding_seed: Round updated bfloat16 params stochastically
            (unbiased: up or down with the probabilities that keep the
            expected value), with random bits derived from this seed,
            ``rounding_step`` and the param's position in ``params``: the
            same inputs give the same bits. Not with ``master_params``;
            float16 params are refused (use master copies).
        rounding_step: The integer step counter for ``rounding_seed`` (the
            scheduled variant uses ``step`` when this is ``None``).

    Returns:
        ``(new_params, new_velocities)`` (``velocities`` unchanged, or
        ``[]``, when momentum is 0), and ``new_master_params`` third when
        ``master_params`` is given.
    """
    options = sgd_settings(
        grads,
        momentum=momentum,
        weight_decay=weight_decay,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        grad_scale=grad_scale,
        skip=skip,
        max_grad_norm=max_grad_norm,
        clip_factor=clip_factor,
        master_params=master_params,
        rounding_seed=rounding_seed,
        rounding_step=rounding_step,
    )
    out = apply_update(
        params,
        grads,
        velocities,
        options,
        learning_rate=learning_rate,
        tensors_per_primitive=tensors_per_primitive,
        stream=stream,
    )
    return _many_result(out, master_params)


@overload
def sgd_update_many_scheduled(
    params: Sequence[mx.array],
    grads: Sequence[mx.array],
    velocities: Sequence[mx.array] | None = None,
    *,
    step: mx.array,
    schedule: StepDecay,
    master_params: None = None,
    **options: Unpack[_UpdateOptions],
) -> _Pair: ...


@overload
def sgd_update_many_scheduled(
    params: Sequence[mx.array],
    grads: Sequence[mx.array],
    velocities: Sequence[mx.array] | None = None,
    *,
    step: mx.array,
    schedule: StepDecay,
    master_params: Sequence[mx.array | None],
    **options: Unpack[_UpdateOptions],
) -> _Triple: ...


def sgd_update_many_scheduled(
    params: Sequence[mx.array],
    grads: Sequence[mx.array],
    velocities: Sequence[mx.array] | None = None,
    *,
    step: mx.array,
    schedule: StepDecay,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: float | mx.array | None = None,
    skip: mx.array | None = None,
    max_grad_norm: float | None = None,
    clip_factor: mx.array | None = None,
    master_params: Sequence[mx.array | None] | None = None,
    rounding_seed: int | None = None,
    rounding_step: mx.array | int | None = None,
    tensors_per_primitive: int = _ext.DEFAULT_TENSORS_PER_PRIMITIVE,
    stream: StreamOrDevice = None,
) -> _Pair | _Triple:
    """:func:`sgd_update_many` with the step-decay learning rate computed in
    the kernel from ``step`` (also the default ``rounding_step``)."""
    options = sgd_settings(
        grads,
        momentum=momentum,
        weight_decay=weight_decay,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        grad_scale=grad_scale,
        skip=skip,
        max_grad_norm=max_grad_norm,
        clip_factor=clip_factor,
        master_params=master_params,
        rounding_seed=rounding_seed,
        rounding_step=rounding_step,
    )
    out = apply_update(
        params,
        grads,
        velocities,
        options,
        step=step,
        schedule=schedule,
        tensors_per_primitive=tensors_per_primitive,
        stream=stream,
    )
    return _many_result(out, master_params)
