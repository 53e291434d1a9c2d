"""FusedSGD: a drop-in for mlx.optimizers.SGD whose step is fused C++ ops."""

from __future__ import annotations

import numbers
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import mlx.core as mx
from mlx.optimizers import Optimizer

from . import _ext
from .functional import (
    apply_update,
    as_grad_scale,
    check_learning_rate,
    check_max_grad_norm,
    check_rounding_seed,
    clip_factor_for,
    grad_norm,
)
from .schedules import StepDecay

_array = mx.array
_HALF = (mx.float16, mx.bfloat16)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(x: Any) -> str:
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)} entries"
    if isinstance(x, mx.array):
        return f"an array of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _mismatch(path: str, grads: Any, params: Any) -> ValueError:
    return ValueError(
        f"The gradient tree does not match the parameters at "
        f"'{path or '<root>'}': gradients have {_describe(grads)}, "
        f"parameters have {_describe(params)}."
    )


def _param_at(params: Any, key: Any, path: str, grads: Any) -> Any:
    """``params[key]``, read as ``tree_map`` reads it (by indexing, whatever
    ``params`` is), or the error that names the gradient's path."""
    try:
        return params[key]
    except Exception:
        if isinstance(params, Mapping) and isinstance(grads, dict):
            raise ValueError(
                "The gradient tree does not match the parameters: "
                f"gradient '{_join(path, key)}' has no parameter."
            ) from None
        raise _mismatch(path, grads, params) from None


def _collect(
    grads: Any,
    params: Any,
    state: Any,
    path: str,
    out_g: list,
    out_p: list,
    out_s: list,
) -> None:
    """Walk ``grads`` as ``tree_map`` does and gather its leaves with the
    matching params and per-parameter state dicts (``None`` for ``state``
    checks the params alone).

    The tree rule (docs/guarantees.md): the gradient tree drives the walk;
    each dict, list or tuple of gradients indexes the params by its own keys
    or positions, whatever the params hold there (a dict, an ``nn.Module``,
    a list, an int-keyed dict, even a string), so an empty one reads nothing
    and the params may hold attributes of any kind where the gradients do
    not look. A gradient leaf must be an mx.array facing an mx.array param.
    Runs every step, so the common case is kept lean: paths are only built
    for an error message."""
    if isinstance(grads, dict):
        for k, g in grads.items():
            p = _param_at(params, k, path, grads)
            sub = state[k] if state is not None else None
            if type(g) is _array and type(p) is _array:
                out_g.append(g)
                out_p.append(p)
                out_s.append(sub)
            else:
                _collect(g, p, sub, _join(path, k), out_g, out_p, out_s)
    elif isinstance(grads, (list, tuple)):
        for i, g in enumerate(grads):
            p = _param_at(params, i, path, grads)
            sub = state[i] if state is not None else None
            _collect(g, p, sub, _join(path, i), out_g, out_p, out_s)
    elif isinstance(grads, mx.array):
        if not isinstance(params, mx.array):
            raise _mismatch(path, grads, params)
        out_g.append(grads)
        out_p.append(params)
        out_s.append(state)
    else:
        raise TypeError(
            f"gradient '{path or '<root>'}' must be an mx.array, but got "
            f"{type(grads).__name__}."
        )


def _leaf_items(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """The leaves of ``tree`` with their paths ('layers.7.bias'), in the
    order :func:`_collect` gathers them. Off the hot path (error messages,
    init)."""
    if isinstance(tree, dict):
        return [q for k, v in tree.items() for q in _leaf_items(v, _join(path, k))]
    if isinstance(tree, (list, tuple)):
        return [q for i, v in enumerate(tree) for q in _leaf_items(v, _join(path, i))]
    return [(path or "<root>", tree)]


def _leaf_paths(tree: Any) -> list[str]:
    return [path for path, _ in _leaf_items(tree)]


# How the C++ ops name tensor i of the lists they are given.
_INDEXED = re.compile(r"\b(param|grad|grads|velocity|master_params)\[(\d+)\]")
_SINGLE = re.compile(r"\b(param|grad|velocity|master_params)(?= (?:has|is)\b)")
_NAMES = {
    "param": "param",
    "grad": "gradient",
    "grads": "gradient",
    "velocity": "momentum buffer",
    "master_params": "master copy",
}


def _with_paths(error: ValueError, gradients: Any) -> ValueError:
    """``error`` of a C++ op with each tensor named by its path in the tree
    ("param 'layers.7.bias'" for "param[15]"), or prefixed by the path when
    the op was given a single tensor (and named none)."""
    paths = _leaf_paths(gradients)
    message = str(error)

    def name(m: re.Match) -> str:
        i = int(m.group(2))
        where = paths[i] if i < len(paths) else m.group(0)
        return f"{_NAMES[m.group(1)]} '{where}'"

    named = _INDEXED.sub(name, message)
    if named == message and len(paths) == 1:
        # A single tensor: the ops name it without an index.
        named = _SINGLE.sub(lambda m: f"{_NAMES[m.group(1)]} '{paths[0]}'", message)
    return ValueError(named)


def _missing_state(grads: Any, state: Any, path: str = "") -> str | None:
    """The path of the first gradient the optimizer state has no entry for
    (``None``: every one has). Built only for an error message."""
    if isinstance(grads, (dict, list, tuple)):
        keys = grads.keys() if isinstance(grads, dict) else range(len(grads))
        for k in keys:
            try:
                sub = state[k]
            except (KeyError, IndexError, TypeError):
                return _join(path, k)
            found = _missing_state(grads[k], sub, _join(path, k))
            if found is not None:
                return found
    return None


def _as_buffer(v: Any, path: str) -> mx.array:
    """A momentum buffer from the state as an mx.array: a NumPy array (a
    hand-edited state; stock computes with it) is converted, anything else
    refused by the parameter's path."""
    if isinstance(v, mx.array):
        return v
    if type(v).__module__ == "numpy" and hasattr(v, "__array__"):
        return mx.array(v)
    raise ValueError(
        f"momentum buffer '{path}' must be an mx.array (or a NumPy array), but "
        f"the optimizer state holds {'None' if v is None else _describe(v)}."
    )


def _like(tree: list | tuple, items: Any) -> list | tuple:
    """A list or tuple of ``tree``'s type holding ``items``; namedtuples take
    their fields as arguments (as ``mlx.utils.tree_map`` rebuilds them)."""
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        return type(tree)(*items)
    return type(tree)(items)


def _copy_containers(tree: Any) -> Any:
    """A copy of the dicts, lists and tuples of ``tree``, sharing its leaves."""
    if isinstance(tree, dict):
        return {k: _copy_containers(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return _like(tree, [_copy_containers(v) for v in tree])
    return tree


def _rebuild(grads: Any, new_leaves: Any) -> Any:
    """A tree shaped like ``grads`` (as ``tree_map`` builds it) holding the
    next values of the iterator ``new_leaves``."""
    if isinstance(grads, dict):
        return {
            k: next(new_leaves) if type(g) is _array else _rebuild(g, new_leaves)
            for k, g in grads.items()
        }
    if isinstance(grads, (list, tuple)):
        return _like(grads, [_rebuild(g, new_leaves) for g in grads])
    return next(new_leaves)


class FusedSGD(Optimizer):
    r"""Stochastic gradient descent with every tensor's step fused into one
    pass over memory; a drop-in for :class:`mlx.optimizers.SGD`.

    Same arguments, validation, ``state`` layout and numbers as stock SGD
    (bit-identical in float32 on the CPU):

    .. math::

        v_{t+1} &= \mu v_t + (1 - \tau) g_t \\
        w_{t+1} &= w_t - \lambda v_{t+1}

    A :func:`mlx_fused_sgd.step_decay` schedule is folded into the update
    kernel (the learning rate is computed from the step counter on the
    device); any other schedule is evaluated once per step and its value
    passed to the kernel. The whole tree is updated with a few primitives
    (a few tensors of one dtype each, as :func:`sgd_update_many` packs them
    by default), not one op per parameter.

    Args:
        learning_rate (float or callable): The learning rate :math:`\lambda`.
        momentum (float, optional): The momentum strength :math:`\mu`.
            Default: ``0``
        weight_decay (float, optional): The weight decay (L2 penalty).
            Default: ``0``
        dampening (float, optional): Dampening for momentum :math:`\tau`.
            Default: ``0``
        nesterov (bool, optional): Enables Nesterov momentum. Default: ``False``
        maximize (bool, optional): Maximize the objective (PyTorch's meaning:
          the gradient is negated before weight decay). Default: ``False``
        grad_scale (float or array, optional): Loss scale; every gradient is
          divided by it inside the update kernel (an array stays on the
          device, e.g. a dynamic loss scale). Settable between steps.
          Default: ``None``
        state_dtype (Dtype, optional): ``mx.float32`` keeps the momentum
          buffers of float16/bfloat16 params in float32 (the update reads and
          writes them at full precision; the params stay in their dtype).
          ``None`` (default): the param's dtype, as stock (for a float32
          param with a float16/bfloat16 gradient and no weight decay, the
          gradient's dtype, as stock: stock then computes that update in
          the gradient's dtype, and so does FusedSGD, with stock's ops, not
          the fused kernel; a warning at the first step names such params).
        max_grad_norm (float, optional): Clip all gradients together to this
          global L2 norm (after unscaling), as ``optim.clip_grad_norm`` does,
          inside the update kernel: the norm is reduced on the device and no
          clipped gradient is materialized. :attr:`last_grad_norm` holds the
          norm of the last step (an array). Default: ``None``
        skip_nonfinite (bool, optional): If any gradient holds a NaN or an
          Inf, the step is a no-op decided on the device: params, momentum
          buffers, step counter and learning rate all stay as they were;
          :attr:`last_step_skipped` tells (as an array). Default: ``False``
        master_weights (bool, optional): Keep a float32 copy of every
          float16/bfloat16 param in the state (``"master"``); the kernel
          updates the copy and writes the param as its rounding, so updates
          smaller than the param's precision accumulate. A state without
          copies (a stock checkpoint) starts them from the params, and so
          does every element whose param is no longer its copy's rounding
          (params reloaded or changed outside the optimizer).
          Default: ``False``
        stochastic_rounding (bool, optional): Round updated bfloat16 params
          stochastically (unbiased: up with probability equal to the
          fraction of an ulp), with random bits derived from
          ``rounding_seed``, the step counter and the param's place in the
          tree: the same seed and step give the same bits. Not with
          ``master_weights``; float16 params are refused. Default: ``False``
        rounding_seed (int, optional): The seed of ``stochastic_rounding``
          (an argument, not part of ``state``: pass the same seed when
          resuming from a checkpoint to continue the same random sequence).
          Default: ``0``

    The state holds ``step``, ``learning_rate`` and, when ``momentum > 0``,
    ``{"v": buffer}`` per parameter, exactly as stock SGD stores them, so
    checkpoints move between the two (``master_weights`` adds ``"master"``
    entries, which stock ignores). It also holds what changes between steps
    and what a step reports, when the options are on: ``grad_scale``,
    ``last_grad_norm`` and ``last_step_skipped`` (stock ignores them too).
    So MLX's compile idiom (``state = [model.state, optimizer.state]``,
    ``mx.compile(..., inputs=state, outputs=state)``) sees a loss scale
    changed between compiled steps, and the reports can be read after one.
    """

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array | float],
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        grad_scale: float | mx.array | None = None,
        skip_nonfinite: bool = False,
        max_grad_norm: float | None = None,
        state_dtype: mx.Dtype | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
    ) -> None:
        for name, value in (
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("dampening", dampening),
        ):
            scalar_array = isinstance(value, mx.array) and value.size == 1
            if isinstance(value, bool) or not (
                isinstance(value, numbers.Real) or scalar_array
            ):
                raise TypeError(
                    f"{name} must be a real number, but got "
                    f"{type(value).__name__} {value!r}."
                )
        if nesterov and (momentum <= 0 or dampening != 0):
            # Same check and message as stock SGD.
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening."
            )
        _ext.SGDSettings(
            momentum=float(momentum),
            weight_decay=float(weight_decay),
            dampening=float(dampening),
            nesterov=bool(nesterov),
        ).validate()
        if isinstance(learning_rate, (int, float)) and not isinstance(
            learning_rate, bool
        ):
            # The kernels compute with float32(learning_rate): refuse what
            # overflows it (stock would compute with inf), and give ints past
            # int32 as floats (mx.array cannot take them as they are).
            check_learning_rate(learning_rate)
            if isinstance(learning_rate, int) and abs(learning_rate) >= 2**31:
                learning_rate = float(learning_rate)
        super().__init__()
        # A StepDecay gives a float only for a Python int step; MLX calls
        # schedules with the array step counter.
        self._maybe_schedule("learning_rate", learning_rate)  # type: ignore[arg-type]
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.dampening = dampening
        self.nesterov = nesterov
        self.maximize = bool(maximize)
        self.grad_scale = grad_scale
        self.skip_nonfinite = bool(skip_nonfinite)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        if state_dtype is not None and state_dtype != mx.float32:
            raise ValueError(
                f"state_dtype must be None (the param's dtype) or mlx.core.float32, "
                f"but got {state_dtype}."
            )
        self.state_dtype = state_dtype
        if master_weights and stochastic_rounding:
            raise ValueError(
                "master_weights and stochastic_rounding are alternatives for "
                "half-precision params; choose one."
            )
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.rounding_seed = check_rounding_seed(rounding_seed, allow_none=False)
        self._checked_unfused = False  # see _warn_if_unfused

    # What changes between steps (the loss scale) and what a step reports
    # live in `state`, as stock keeps its step and learning rate there: MLX's
    # compile idiom (inputs=state, outputs=state) then carries them in and
    # out of a compiled step, and checkpoints keep them.

    @property
    def last_grad_norm(self) -> mx.array | None:
        """The global gradient norm of the last step (after unscaling), a
        float32 array on the device (``state["last_grad_norm"]``); ``None``
        without ``max_grad_norm`` or before the first step."""
        return self._state.get("last_grad_norm")

    @property
    def last_step_skipped(self) -> mx.array:
        """A boolean scalar array (``state["last_step_skipped"]``): whether the
        last step was skipped for a non-finite gradient (always False without
        ``skip_nonfinite``). Reading it as a Python bool (``.item()``) syncs
        with the device."""
        return self._state.get("last_step_skipped", mx.array(False))

    @property
    def grad_scale(self) -> mx.array | None:
        """The loss scale the gradients are divided by (``None``: none),
        kept as ``state["grad_scale"]`` so that a compiled step sees every
        change."""
        return self._state.get("grad_scale")

    @grad_scale.setter
    def grad_scale(self, grad_scale: float | mx.array | None) -> None:
        scale = as_grad_scale(grad_scale)
        if scale is None:
            self._state.pop("grad_scale", None)
        else:
            self._state["grad_scale"] = scale

    @property
    def state(self) -> dict:
        """The optimizer's state: ``step``, ``learning_rate`` and, per
        parameter, ``{"v": buffer}`` when momentum is on (stock layout)."""
        return self._state

    @state.setter
    def state(self, state: dict) -> None:
        # Checked whole before it replaces anything (a checkpoint of the
        # wrong kind is refused, never half loaded); the per-parameter
        # buffers are checked against the params at the next step.
        if not isinstance(state, dict):
            raise ValueError(
                f"state must be a dict (as optimizer.state is), got "
                f"{type(state).__name__}."
            )
        step = state.get("step")
        if step is not None and not (
            isinstance(step, mx.array)
            and step.size == 1
            and mx.issubdtype(step.dtype, mx.integer)
        ):
            raise ValueError(
                "state['step'] must be an integer scalar array (stock stores "
                f"uint64), got {_describe(step)}"
                + (f" of dtype {step.dtype}" if isinstance(step, mx.array) else "")
                + ". step must be an integer scalar."
            )
        for key in ("learning_rate", "grad_scale", "last_grad_norm"):
            x = state.get(key)
            if x is not None and not (isinstance(x, mx.array) and x.size == 1):
                raise ValueError(
                    f"state['{key}'] must be a scalar array, got "
                    f"{_describe(x)}; {key} must be a scalar."
                )
        # A checkpoint without a loss scale (stock's, or one saved without)
        # keeps the optimizer's own; one with a scale resumes it.
        scale = getattr(self, "_state", {}).get("grad_scale")
        if scale is not None and "grad_scale" not in state:
            state["grad_scale"] = scale
        self._initialized = False
        self._state = state

    def init(self, parameters: dict) -> None:
        """Initialize the state for ``parameters`` (stock's ``init``); a
        float16 param with ``stochastic_rounding`` is refused by its path
        before anything is initialized."""
        if self.stochastic_rounding:
            for path, p in _leaf_items(parameters):
                if isinstance(p, mx.array) and p.dtype == mx.float16:
                    raise ValueError(
                        f"stochastic_rounding rounds bfloat16 params, but param "
                        f"'{path}' is float16; use master_weights=True for "
                        "float16 params."
                    )
        super().init(parameters)

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Initialize the momentum buffer (only when momentum is on), in
        ``state_dtype`` for half params when it is set, and the float32
        master copy of a half param with ``master_weights``."""
        if self.stochastic_rounding and parameter.dtype == mx.float16:
            raise ValueError(
                "stochastic_rounding rounds bfloat16 params, but a param of "
                f"shape {tuple(parameter.shape)} is float16; use "
                "master_weights=True for float16 params."
            )
        if self.master_weights and parameter.dtype in _HALF:
            state["master"] = parameter.astype(mx.float32)
        if self.momentum > 0:
            state["v"] = self._zero_buffer(parameter)

    def _settings(self) -> _ext.SGDSettings:
        """The options of a step (the per-step ones are set by the step)."""
        return _ext.SGDSettings(
            momentum=float(self.momentum),
            weight_decay=float(self.weight_decay),
            dampening=float(self.dampening),
            nesterov=bool(self.nesterov),
            maximize=self.maximize,
            grad_scale=self.grad_scale,
        )

    def apply_single(
        self, gradient: mx.array, parameter: mx.array, state: dict
    ) -> mx.array:
        """One parameter's update with the current learning rate (for code
        that drives optimizers per parameter; :meth:`apply_gradients` does
        not use it). The options that need every gradient at once
        (``max_grad_norm``, ``skip_nonfinite``) or the param's place in the
        tree and its master copy (``stochastic_rounding``,
        ``master_weights``) are refused here rather than silently left
        out."""
        if self.max_grad_norm is not None or self.skip_nonfinite:
            raise ValueError(
                "apply_single updates one parameter alone; max_grad_norm and "
                "skip_nonfinite look at all gradients together: use "
                "apply_gradients (or update)."
            )
        if self.master_weights or self.stochastic_rounding:
            raise ValueError(
                "apply_single does not support master_weights or "
                "stochastic_rounding: use apply_gradients (or update)."
            )
        velocity = state.get("v") if self.momentum > 0 else None
        new_params, new_velocities, _ = apply_update(
            [parameter],
            [gradient],
            None if velocity is None else [velocity],
            self._settings(),
            learning_rate=self.learning_rate,
            tensors_per_primitive=1,
        )
        if self.momentum > 0:
            state["v"] = new_velocities[0]
        return new_params[0]

    def apply_gradients(self, gradients: dict, parameters: dict) -> Any:
        """Apply the gradients to the parameters and return the updated
        parameters, as :meth:`mlx.optimizers.Optimizer.apply_gradients` does.

        Everything is checked before anything changes: on an error the
        parameters and the optimizer state (step counter included) are
        exactly what they were.
        """
        if self._initialized:
            return self._apply_gradients(gradients, parameters)
        # The first step initializes the state in place (stock's init); undo
        # that too if the step is refused, in place: code holding the state
        # dict (MLX's compile idiom, state = [model.state, optimizer.state])
        # keeps seeing the optimizer's state.
        if isinstance(gradients, (list, tuple)):
            # The state is a dict with "step" and "learning_rate" beside the
            # per-parameter entries: stock's init fails on such a tree too.
            raise ValueError(
                "The gradient tree must be a dict (or a single array) at "
                f"'<root>', as for optim.SGD, but got {_describe(gradients)}."
            )
        snapshot = _copy_containers(self._state)
        try:
            # Check the trees first, then initialize from the params (shaped
            # like the gradient tree) so that a bad gradient is reported as
            # such, not as a bad momentum buffer made from it.
            grads: list[mx.array] = []
            params: list[mx.array] = []
            _collect(gradients, parameters, None, "", grads, params, [])
            existing = {id(x) for _, x in _leaf_items(self._state)}
            self.init(_rebuild(gradients, iter(params)))
            self._init_in_grad_dtype(gradients, parameters, grads, params, existing)
            return self._apply_gradients(gradients, parameters)
        except BaseException:
            self._state.clear()
            self._state.update(snapshot)
            self._initialized = False
            raise

    def _init_in_grad_dtype(
        self,
        gradients: Any,
        parameters: Any,
        grads: list[mx.array],
        params: list[mx.array],
        existing: set[int],
    ) -> None:
        """First step: a float32 param with a float16/bfloat16 gradient and
        no weight decay is updated in the gradient's dtype, as stock does;
        stock makes its momentum buffers from the gradients, so give the
        buffers just made for such params the gradient's dtype too
        (``state_dtype=float32`` keeps them float32)."""
        if self.momentum <= 0 or self.state_dtype is not None:
            return
        in_grad_dtype = self._in_grad_dtype(grads, params)
        if not in_grad_dtype:
            return
        states: list[Any] = []
        _collect(gradients, parameters, self.state, "", [], [], states)
        for i in in_grad_dtype:
            if id(states[i].get("v")) not in existing:
                states[i]["v"] = self._zero_buffer(params[i], grads[i])

    def _in_grad_dtype(
        self, grads: list[mx.array], params: list[mx.array]
    ) -> list[int]:
        """Which params are updated in their gradient's dtype, with stock's
        ops rather than the fused kernel: float32 params with float16/bfloat16
        gradients, without weight decay."""
        if self.weight_decay != 0:
            return []
        return [
            i
            for i, (g, p) in enumerate(zip(grads, params))
            if p.dtype == mx.float32 and g.dtype in _HALF
        ]

    def _warn_if_unfused(
        self, gradients: Any, grads: list[mx.array], params: list[mx.array]
    ) -> None:
        """Once per optimizer, at its first update: name the params that the
        fused kernel does not update (see :meth:`_in_grad_dtype`; float64
        params)."""
        self._checked_unfused = True
        in_grad_dtype = self._in_grad_dtype(grads, params)
        float64 = [i for i, p in enumerate(params) if p.dtype == mx.float64]
        if not in_grad_dtype and not float64:
            return
        paths = _leaf_paths(gradients)

        def named(indices: list[int]) -> tuple[str, bool]:
            text = ", ".join(f"'{paths[i]}'" for i in indices[:3])
            if len(indices) > 3:
                text += f" and {len(indices) - 3} more"
            one = len(indices) == 1
            return (
                f"{'param' if one else 'params'} {text} {'is' if one else 'are'}",
                one,
            )

        if in_grad_dtype:
            which, one = named(in_grad_dtype)
            dtypes = sorted({str(grads[i].dtype).split(".")[-1] for i in in_grad_dtype})
            warnings.warn(
                f"FusedSGD: {which} float32 with {'a ' if one else ''}"
                f"{'/'.join(dtypes)} {'gradient' if one else 'gradients'} and "
                "weight_decay is 0: stock SGD computes such an update in the "
                "gradient's dtype, and so does FusedSGD, with stock's ops rather "
                "than the fused kernel. Cast the gradients to float32 for the "
                "fused float32 update.",
                stacklevel=4,
            )
        if float64:
            which, _ = named(float64)
            warnings.warn(
                f"FusedSGD: {which} float64: FusedSGD updates float64 with "
                "stock's ops in double (stock's bits, on the CPU), not the "
                "fused kernel. Cast to float32 for the fused update.",
                stacklevel=4,
            )

    def _apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        momentum_on = self.momentum > 0
        # The trees MLX builds are flattened in C++; anything else (and every
        # error, named by its path) by the Python walk below.
        walked = _ext.collect_tree(
            gradients, parameters, self.state, "v" if momentum_on else None
        )
        if walked is not None:
            grads, params, states, velocities = walked
        else:
            grads, params, states, velocities = self._collect_checked(
                gradients, parameters, momentum_on
            )
        if not self._checked_unfused:
            self._warn_if_unfused(gradients, grads, params)
        return self._apply_flat(gradients, grads, params, states, velocities)

    def _collect_checked(
        self, gradients: Any, parameters: Any, momentum_on: bool
    ) -> tuple[list, list, list, list]:
        """The Python walk: the leaves, params, state dicts and momentum
        buffers, or the error that names the offending parameter's path."""
        grads: list[mx.array] = []
        params: list[mx.array] = []
        states: list[dict] = []
        try:
            _collect(gradients, parameters, self.state, "", grads, params, states)
        except (KeyError, IndexError) as e:
            where = _missing_state(gradients, self.state)
            entry = f"for parameter '{where}'" if where else f"{e} for a gradient"
            raise ValueError(
                f"the optimizer state has no entry {entry}; the state does not "
                "match these parameters."
            ) from None
        velocities = []
        if momentum_on:
            if isinstance(gradients, mx.array):
                # Its state would be the optimizer's own dict (stock fails
                # here too: it finds no buffer there).
                raise ValueError(
                    "a single array at '<root>' has no momentum buffer: with "
                    "momentum, pass the gradients and params as a dict, e.g. "
                    "{'w': array}."
                )
            if not all(isinstance(s, dict) for s in states):
                paths = _leaf_paths(gradients)
                where, found = next(
                    (q, s) for q, s in zip(paths, states) if not isinstance(s, dict)
                )
                raise ValueError(
                    f"the optimizer state for parameter '{where}' must be a dict, "
                    f"but it is {_describe(found)}; the state does not match "
                    "these parameters."
                )
            # A buffer missing while momentum is on (momentum switched on
            # between steps: FusedSGD keeps none at momentum 0; a state saved
            # without) starts as stock's would be: zeros, in the dtype
            # init_single gives it. The commit stores it with the others.
            velocities = [
                s["v"] if "v" in s else self._zero_buffer(p, g)
                for s, p, g in zip(states, params, grads)
            ]
            if not all(isinstance(v, mx.array) for v in velocities):
                paths = _leaf_paths(gradients)
                velocities = [_as_buffer(v, q) for v, q in zip(velocities, paths)]
        return grads, params, states, velocities

    def _zero_buffer(self, param: mx.array, grad: mx.array | None = None) -> mx.array:
        """A new momentum buffer: in ``state_dtype`` for a half param when it
        is set; in the gradient's dtype where stock computes the update in it
        (:meth:`_in_grad_dtype`; only when ``grad`` is given); else the
        param's. The one rule for :meth:`init_single`, the first step and a
        buffer missing while momentum is on."""
        if self.state_dtype is not None and param.dtype in _HALF:
            return mx.zeros(param.shape, self.state_dtype)
        if grad is not None and self._in_grad_dtype([grad], [param]):
            return mx.zeros(param.shape, grad.dtype)
        return mx.zeros_like(param)

    def _apply_flat(
        self,
        gradients: Any,
        grads: list[mx.array],
        params: list[mx.array],
        states: list[dict],
        velocities: list[mx.array],
    ) -> Any:
        """The step over the flattened tree: the update ops, the result tree
        shaped like ``gradients``, then the commit to the state."""
        momentum_on = self.momentum > 0
        step = self.step
        settings = self._settings()
        masters = None
        if self.master_weights:
            # A state without master copies (a stock checkpoint) starts them
            # from the params.
            masters = [
                (s["master"] if "master" in s else p.astype(mx.float32))
                if p.dtype in _HALF
                else None
                for p, s in zip(params, states)
            ]
            settings.master_params = masters
        if self.stochastic_rounding:
            settings.rounding_seed = self.rounding_seed
            settings.rounding_step = step
        # The C++ ops name tensors by index; errors name them by path.
        try:
            skip = _ext.grads_nonfinite(grads) if self.skip_nonfinite else None
            settings.skip = skip
            norm = None
            if self.max_grad_norm is not None:
                norm = grad_norm(grads, self.grad_scale)
                settings.clip_factor = clip_factor_for(norm, self.max_grad_norm)
            scheduler = self._schedulers.get("learning_rate")
            # Only exactly step decay is folded into the kernel; a subclass (one
            # that adds warm-up, say) is evaluated like any other schedule.
            if type(scheduler) is StepDecay:
                # The kernel computes lr_k from the step counter itself; the
                # state still records lr_k as stock does.
                learning_rate = scheduler(step)
                new_params, new_velocities, new_masters = apply_update(
                    params, grads, velocities, settings, step=step, schedule=scheduler
                )
            else:
                if scheduler is not None:
                    learning_rate = scheduler(step)
                else:
                    learning_rate = self.state["learning_rate"]
                if not isinstance(learning_rate, mx.array):
                    learning_rate = mx.array(learning_rate)
                new_params, new_velocities, new_masters = apply_update(
                    params, grads, velocities, settings, learning_rate=learning_rate
                )
        except ValueError as e:
            raise _with_paths(e, gradients) from None

        # The result first: nothing that can fail comes after the commit.
        result = _ext.rebuild_tree(gradients, new_params)
        if result is None:  # a namedtuple, an array subclass
            result = _rebuild(gradients, iter(new_params))

        # Commit: nothing above touched the state. A skipped step (decided on
        # the device) keeps the step counter and the learning rate too.
        if skip is not None:
            learning_rate = mx.where(skip, self.state["learning_rate"], learning_rate)
            self.state["step"] = mx.where(skip, step, step + 1)
            self.state["last_step_skipped"] = skip
        else:
            self.state["step"] = step + 1
        self.state["learning_rate"] = learning_rate
        if norm is not None:
            self.state["last_grad_norm"] = norm
        if momentum_on:
            _ext.set_state_items(states, "v", new_velocities)
        if masters is not None:
            _ext.set_state_items(states, "master", new_masters)
        return result
