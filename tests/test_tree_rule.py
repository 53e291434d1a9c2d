"""The tree rule (docs/guarantees.md), derived from ``mlx.utils.tree_map``
itself: stock ``optim.SGD`` is the oracle. Random (gradients, params) pairs
are built from a gradient tree and params that mirror it with random changes
(attributes of every kind where the gradients hold an empty container,
Mappings that are not dicts, int-keyed dicts for lists and lists for
int-keyed dicts, missing entries, short lists, containers for leaves). What
stock accepts, FusedSGD accepts with the same result structure and bits; what
stock rejects, FusedSGD rejects with an error that names a path, and nothing
changes. The C++ walk and the Python walk see the same leaves."""

import os
import types

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs
from mlx_fused_sgd import optimizer as opt_module

from helpers import assert_bitwise_equal, small_llama

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _array(draw, shape):
    seed = draw(st.integers(0, 2**16))
    return mx.random.normal(shape, key=mx.random.key(seed))


# What a module may hold where its gradients hold an empty container (a
# plain attribute: parameters() shows it as {} or []).
ATTRIBUTES = [
    lambda: "full_attention",
    lambda: ["full_attention", "sliding_attention"],
    lambda: {"act": "gelu"},
    lambda: [1, 2],
    lambda: [None, None],
    lambda: [(1, 2), (3, 4)],
    lambda: [["a"], ["b"]],
    lambda: ["a", nn.ReLU()],
    lambda: 3,
    lambda: None,
    lambda: len,
    lambda: nn.ReLU(),
    lambda: mx.ones((2,)),
    lambda: types.MappingProxyType({"k": "v"}),
]


@st.composite
def grad_tree(draw, depth=0):
    if depth == 0:  # mostly dicts at the root, as models give (a list is refused)
        kinds = ["dict"] * 5 + ["int_dict", "leaf", "list", "empty_dict"]
    elif depth < 3:
        kinds = [
            "leaf",
            "dict",
            "list",
            "tuple",
            "int_dict",
            "empty_dict",
            "empty_list",
        ]
    else:
        kinds = ["leaf", "empty_dict", "empty_list"]
    kind = draw(st.sampled_from(kinds))
    if kind == "leaf":
        return _array(draw, (draw(st.integers(1, 3)),))
    if kind == "empty_dict":
        return {}
    if kind == "empty_list":
        return draw(st.sampled_from([[], ()]))
    n = draw(st.integers(1, 3))
    children = [draw(grad_tree(depth + 1)) for _ in range(n)]
    if kind == "dict":
        return dict(zip(["a", "b", "c"], children))
    if kind == "int_dict":
        return dict(enumerate(children))
    return children if kind == "list" else tuple(children)


@st.composite
def params_for(draw, g):
    """Params that mirror ``g``, changed at random places."""
    change = draw(
        st.sampled_from(["same"] * 6 + ["other_container", "attribute", "break"])
    )
    if isinstance(g, mx.array):
        if change == "attribute":
            return draw(st.sampled_from(ATTRIBUTES))()
        if change == "break":
            return {"x": g}
        return _array(draw, g.shape)
    if change == "attribute":
        return draw(st.sampled_from(ATTRIBUTES))()
    if isinstance(g, dict):
        sub = {k: draw(params_for(v)) for k, v in g.items()}
        if change == "break" and sub:
            sub.pop(draw(st.sampled_from(list(sub))))
        elif draw(st.booleans()):
            sub["extra"] = draw(st.sampled_from(ATTRIBUTES))()
        if change == "other_container":
            if all(isinstance(k, int) for k in sub):
                # An int-keyed dict of gradients against a list of params.
                return [sub[i] for i in range(len(sub))]
            return types.MappingProxyType(sub)
        return sub
    sub = [draw(params_for(v)) for v in g]
    if change == "break" and sub:
        sub.pop()
    elif draw(st.booleans()):
        sub.append(draw(st.sampled_from(ATTRIBUTES))())
    if change == "other_container":
        # A list of gradients against an int-keyed dict of params.
        return dict(enumerate(sub))
    return draw(st.sampled_from([list, tuple]))(sub)


class RecordingSGD(optim.SGD):
    """Stock SGD that records the params ``tree_map`` hands to each update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def apply_single(self, gradient, parameter, state):
        new = super().apply_single(gradient, parameter, state)
        self.seen.append((parameter, new))
        return new


def _structure(tree):
    if isinstance(tree, dict):
        return (type(tree), [(k, _structure(v)) for k, v in tree.items()])
    if isinstance(tree, (list, tuple)):
        return (type(tree), [_structure(v) for v in tree])
    return type(tree)


def _stock(grads, params, momentum):
    stock = RecordingSGD(0.1, momentum=momentum, weight_decay=1e-3)
    try:
        result = stock.apply_gradients(grads, params)
        mx.eval(result, stock.state)
    except Exception:
        return None, stock
    return result, stock


@SETTINGS
@given(data=st.data(), momentum=st.sampled_from([0.0, 0.9]))
def test_what_stock_accepts_fused_sgd_accepts(data, momentum):
    grads = data.draw(grad_tree())
    params = data.draw(params_for(grads))
    want, stock = _stock(grads, params, momentum)
    # Where stock turns a param into something else, FusedSGD refuses (the
    # one difference, documented): a Python number where a gradient meets
    # its param (stock returns `number - lr * g`, an array), or an array
    # param that the gradient broadcasts to another shape.
    changed = any(
        not isinstance(p, mx.array) or p.shape != new.shape for p, new in stock.seen
    )
    accepted = want is not None and not changed

    opt = mfs.FusedSGD(0.1, momentum=momentum, weight_decay=1e-3)
    state = opt.state
    if not accepted:
        with pytest.raises((ValueError, TypeError), match="'"):
            opt.apply_gradients(grads, params)
        assert opt.state is state
        assert set(state) == {"step", "learning_rate"}
        assert state["step"].item() == 0
        return

    got = opt.apply_gradients(grads, params)
    assert _structure(got) == _structure(want)
    for (k, a), (_, b) in zip(tree_flatten(got), tree_flatten(want), strict=True):
        assert_bitwise_equal(a, b, k)
    assert _structure(opt.state) == _structure(stock.state) or momentum == 0
    for (k, a), (_, b) in zip(tree_flatten(opt.state), tree_flatten(stock.state)):
        assert_bitwise_equal(a, b, k)

    # Both walks see the same leaves, params and state dicts; plain trees
    # take the C++ walk.
    key = "v" if momentum > 0 else None
    fast = opt_module._ext.collect_tree(grads, params, opt.state, key)
    assert fast is not None
    slow = opt._collect_checked(grads, params, momentum > 0)
    for f, s in zip(fast, slow, strict=True):
        assert len(f) == len(s) and all(x is y for x, y in zip(f, s))

    # A second step walks the state made by the first.
    again = opt.apply_gradients(grads, params)
    assert _structure(again) == _structure(want)


def test_llama_layer_types_attribute():
    """The case that failed on mlx-lm's Llama: a list of strings on the
    module, [{}, {}] in the gradients."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer_types = ["full_attention", "full_attention"]
            self.cfg = {"act": "gelu"}
            self.ids = [1, 2]
            self.proj = nn.Linear(3, 2)

    model, stock_model = Model(), Model()
    stock_model.update(model.parameters())
    grads = nn.value_and_grad(model, lambda m, x: m.proj(x).sum())(
        model, mx.ones((1, 3))
    )[1]
    assert grads["layer_types"] == [{}, {}] and grads["cfg"] == {"act": {}}
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    stock = optim.SGD(0.1, momentum=0.9)
    for _ in range(2):
        opt.update(model, grads)
        stock.update(stock_model, grads)
    mx.eval(model.parameters(), stock_model.parameters())
    assert model.layer_types == ["full_attention", "full_attention"]
    for (k, a), (_, b) in zip(
        tree_flatten(model.parameters()), tree_flatten(stock_model.parameters())
    ):
        assert_bitwise_equal(a, b, k)


@pytest.mark.parametrize(
    "grads, params",
    [
        ({"w": {}}, {"w": mx.ones((2,))}),
        ({"w": [{}, {}]}, {"w": [1, 2]}),
        ({"w": [{}, {}]}, {"w": [None, None]}),
        ({"w": [{}, {}]}, {"w": [(1, 2), (3, 4)]}),
        ({"cfg": {"act": {}}}, {"cfg": {"act": "gelu"}}),
        ({"w": {}}, {"w": [1]}),
        ({"w": []}, {"w": None}),
        ({"w": [[{}]]}, {"w": [["a"]]}),
        ({"w": [{}, {}]}, {"w": ["a", nn.ReLU()]}),
        (
            {"w": {"x": mx.ones((2,))}},
            types.MappingProxyType({"w": {"x": mx.ones((2,))}}),
        ),
        ({"w": [mx.ones((2,))]}, {"w": {0: mx.ones((2,))}}),
        ({"w": {0: mx.ones((2,))}}, {"w": [mx.ones((2,))]}),
    ],
    ids=[
        "empty dict vs array",
        "list of ints",
        "list of None",
        "list of tuples",
        "dict of strings",
        "empty dict vs list",
        "empty list vs None",
        "nested list of strings",
        "string and module",
        "mappingproxy",
        "int-keyed dict params",
        "list params for an int-keyed dict",
    ],
)
def test_cases_found_failing(grads, params):
    """Each case the issue found failing: accepted, stock's result."""
    want = optim.SGD(0.1).apply_gradients(grads, params)
    got = mfs.FusedSGD(0.1).apply_gradients(grads, params)
    assert _structure(got) == _structure(want)
    for (k, a), (_, b) in zip(tree_flatten(got), tree_flatten(want), strict=True):
        assert_bitwise_equal(a, b, k)


@pytest.mark.parametrize(
    "grads, params, match",
    [
        (
            {"w": [mx.ones((2,))] * 2},
            {"w": [mx.ones((2,))]},
            r"at 'w': gradients have a list of 2",
        ),
        ({"w": {"x": mx.ones((2,))}}, {"w": "a"}, r"at 'w': gradients have a dict"),
        ({"w": [{}]}, {"w": None}, r"at 'w': gradients have a list of 1"),
        ({"w": mx.ones((2,))}, {"w": "a"}, r"at 'w': gradients have an array"),
        ({"w": mx.ones((2,))}, {"w": 1.0}, r"at 'w': gradients have an array"),
        (
            {"m": {"w": mx.ones((2,))}},
            {"m": nn.ReLU()},
            r"gradient 'm.w' has no parameter",
        ),
    ],
)
def test_what_stock_rejects_is_refused_by_path(grads, params, match):
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    state = opt.state
    with pytest.raises(ValueError, match=match):
        opt.apply_gradients(grads, params)
    assert opt.state is state and set(state) == {"step", "learning_rate"}


def test_llama_takes_the_cxx_walk(monkeypatch):
    """mlx-lm's Llama (strings in `layer_types`, [{}, {}] in the gradients)
    is walked in C++ every step: the Python walk, the slow path, never runs."""
    model = small_llama()
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    opt.init(model.trainable_parameters())

    def refuse(*args, **kwargs):
        raise AssertionError("the Python tree walk ran")

    monkeypatch.setattr(opt_module, "_collect", refuse)
    monkeypatch.setattr(opt_module, "_rebuild", refuse)
    loss_and_grad = nn.value_and_grad(model, lambda m, x: m(x).sum())
    for _ in range(2):
        _, grads = loss_and_grad(model, mx.array([[1, 2, 3]]))
        assert grads["model"]["layer_types"] == [{}, {}]
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    assert opt.state["step"].item() == 2
