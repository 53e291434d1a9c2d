"""The README's and the docs' code runs as written, and the README's test
command is the one CI runs."""

import re
from pathlib import Path

import pytest

from helpers import pyproject

# Once, on the CPU: the documentation's commands and examples are checked once.
pytestmark = pytest.mark.devices("cpu")


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_quick_start_runs(capsys):
    blocks = _python_blocks(README)
    assert blocks, "README has no python block"
    scope: dict = {}
    exec(compile(blocks[0], "README quick start", "exec"), scope)
    assert scope["optimizer"].state["step"].item() == 100
    printed = capsys.readouterr().out
    assert printed.count("loss") == 4, "the quick start prints its loss"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_python_block_runs(page):
    """Every ```python block of a page runs, in order, in one namespace per
    page (later blocks may use what earlier ones defined)."""
    blocks = _python_blocks(page)
    scope: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name} block {i + 1}", "exec"), scope)


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'pip install ".[test]" && python -m pytest -q tests'
    assert test_cmd in text and test_cmd in ci
    assert 'pip install ".[bench]" && python benchmarks/bench.py' in text


def test_nvidia_install_keeps_mlx_cuda_and_installs_the_test_tools():
    """The NVIDIA section installs the package without its dependencies (its
    mlx[cpu] would overwrite MLX's CUDA library), so its first command must
    install every test requirement itself."""
    section = README.read_text().split("## On NVIDIA GPUs")[1].split("\n## ")[0]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = commands.replace("\\\n", " ")
    first, build = (line for line in commands.splitlines() if "pip install" in line)
    assert "mlx[cuda13]==" in first
    assert "--no-build-isolation --no-deps ." in build
    for req in pyproject()["project"]["optional-dependencies"]["test"]:
        name = re.match(r"[\w-]+", req).group(0)
        assert re.search(rf"(^|\s){name}(\s|==|$)", first), name
    assert "python -m pytest -q tests" in commands


def test_docs_links_resolve():
    """Every relative link of the README and the docs names a file of the
    repository."""
    for page in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_nothing_points_outside_the_repository():
    # Built from parts so that a grep of the repository for such references
    # does not find this test itself.
    outside = ["DESIGN" + ".md", ".." + "/shared"]
    for page in [README, *DOCS]:
        text = page.read_text()
        for name in outside:
            assert name not in text, f"{page.name} names {name}"


def test_option_examples_construct():
    """The docs' option snippets use the real keyword names."""
    snippet = next(
        b for p in DOCS for b in _python_blocks(p) if "rounding_seed=1234" in b
    )
    import mlx.core as mx

    import mlx_fused_sgd as mfs

    scope = {"mx": mx, "mfs": mfs}
    exec(compile(snippet, "docs options", "exec"), scope)
    assert scope["opt"].stochastic_rounding and scope["opt"].rounding_seed == 1234


def test_every_option_example_runs():
    """The one-place example of every option runs, each optimizer taking its
    step."""
    snippet = next(
        b for p in DOCS for b in _python_blocks(p) if "for kw in options:" in b
    )
    scope: dict = {}
    exec(compile(snippet, "docs every option", "exec"), scope)
    assert len(scope["options"]) == 6
    assert scope["opt"].state["step"].item() == 1
    assert scope["new_params"]["w"].tolist() != scope["params"]["w"].tolist()
