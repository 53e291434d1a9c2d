"""The README's quick start runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(device):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python block"
    scope: dict = {}
    exec(compile(blocks[0], "README quick start", "exec"), scope)
    assert scope["optimizer"].state["step"].item() == 100


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = 'pip install ".[test]" && python -m pytest -q tests'
    assert test_cmd in text and test_cmd in ci
    assert 'pip install ".[bench]" && python benchmarks/bench.py' in text


def test_option_examples_construct(device):
    """The README's option snippets use the real keyword names."""
    import mlx.core as mx

    import mlx_fused_sgd as mfs

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    snippet = next(b for b in blocks if "rounding_seed=1234" in b)
    scope = {"mx": mx, "mfs": mfs}
    exec(compile(snippet, "README options", "exec"), scope)
    assert scope["opt"].stochastic_rounding and scope["opt"].rounding_seed == 1234


def test_every_option_example_runs(device):
    """The README's one-place example of every option runs, each optimizer
    taking its step."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    snippet = next(b for b in blocks if "for kw in options:" in b)
    scope: dict = {}
    exec(compile(snippet, "README every option", "exec"), scope)
    assert len(scope["options"]) == 6
    assert scope["opt"].state["step"].item() == 1
    assert scope["new_params"]["w"].tolist() != scope["params"]["w"].tolist()
