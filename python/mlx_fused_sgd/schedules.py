"""Learning-rate schedules whose numbers the fused update can read."""

from __future__ import annotations

import mlx.core as mx

from . import _ext


class StepDecay:
    """A step-decay schedule: ``init * decay_rate ** (step // step_size)``.

    Behaves like the function returned by :func:`mlx.optimizers.step_decay`
    (stock optimizers accept it), and exposes its three numbers so that
    :class:`~mlx_fused_sgd.FusedSGD` computes the learning rate inside the
    update kernel instead of running the schedule as a separate op.
    """

    __slots__ = ("init", "decay_rate", "step_size")

    def __init__(self, init: float, decay_rate: float, step_size: int) -> None:
        if isinstance(step_size, bool) or not isinstance(step_size, int):
            raise TypeError(
                f"step_size must be an int, but got {type(step_size).__name__} "
                f"{step_size!r}."
            )
        if step_size < 1:
            # Same message as stock mlx.optimizers.step_decay.
            raise ValueError(f"step_size must be greater than 0, but got {step_size}.")
        _ext.validate_step_decay(float(init), float(decay_rate), step_size)
        self.init = init
        self.decay_rate = decay_rate
        self.step_size = step_size

    def __call__(self, step: mx.array | int) -> mx.array | float:
        """The learning rate at ``step``.

        An ``mx.array`` step (any integer dtype and shape) runs the
        StepDecayLR primitive and gives float32, bit-identical to stock. A
        Python int step gives the same Python float as stock (double
        precision).
        """
        if isinstance(step, mx.array):
            return _ext.step_decay_lr(
                step, float(self.init), float(self.decay_rate), self.step_size
            )
        if isinstance(step, int) and not isinstance(step, bool):
            return self.init * (self.decay_rate ** (step // self.step_size))
        raise TypeError(
            "step must be an integer mx.array or a Python int, but got "
            f"{type(step).__name__}."
        )

    def __repr__(self) -> str:
        return (
            f"step_decay(init={self.init!r}, decay_rate={self.decay_rate!r}, "
            f"step_size={self.step_size!r})"
        )


def step_decay(init: float, decay_rate: float, step_size: int) -> StepDecay:
    r"""Make a step decay scheduler (drop-in for ``mlx.optimizers.step_decay``).

    Args:
        init (float): Initial value.
        decay_rate (float): Multiplicative factor to decay by.
        step_size (int): Decay every ``step_size`` steps.

    Example:

        >>> lr_schedule = step_decay(1e-1, 0.9, 10)
        >>> optimizer = FusedSGD(learning_rate=lr_schedule)
        >>> optimizer.learning_rate
        array(0.1, dtype=float32)
        >>>
        >>> for _ in range(21): optimizer.update({}, {})
        ...
        >>> optimizer.learning_rate
        array(0.081, dtype=float32)
    """
    return StepDecay(init, decay_rate, step_size)
