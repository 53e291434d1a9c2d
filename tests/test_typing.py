"""The package's type hints serve its users: mypy accepts the README's and
the docs' code, the shipped examples, the package itself, and the typed
uses below (a step-decay schedule given to FusedSGD, the results of the
many-tensor updates unpacked by their count)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_fused_sgd as mfs

# Once, on the CPU: type checking does not depend on the device.
pytestmark = pytest.mark.devices("cpu")


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(mfs.__file__).resolve().parent

TYPED_USES = """
import mlx.core as mx
import mlx_fused_sgd as mfs

optimizer = mfs.FusedSGD(mfs.step_decay(0.1, 0.5, 10), momentum=0.9)
params, grads = [mx.ones((3,))], [mx.ones((3,))]
ps, vs = mfs.sgd_update_many(params, grads, learning_rate=0.1, momentum=0.9)
first: mx.array = ps[0]
ps, vs, masters = mfs.sgd_update_many(
    params, grads, learning_rate=0.1, master_params=[None]
)
ps, vs = mfs.sgd_update_many_scheduled(
    params, grads, step=mx.array(0), schedule=mfs.step_decay(0.1, 0.5, 10)
)
"""

WRONG_USE = """
import mlx.core as mx
import mlx_fused_sgd as mfs

ps, vs, masters = mfs.sgd_update_many([mx.ones((3,))], [mx.ones((3,))], learning_rate=0.1)
"""


def _mypy(*paths: Path, package: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # An editable install keeps the package in the source tree, out of
    # mypy's sight; an installed one is found in site-packages.
    if "site-packages" not in str(PACKAGE):
        env["MYPYPATH"] = str(PACKAGE.parent)
    # The package by its name (-p): a path inside site-packages would make
    # mypy take site-packages for a source tree.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--no-error-summary"]
        + [str(p) for p in paths]
        + (["-p", "mlx_fused_sgd"] if package else []),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _snippets(tmp_path: Path) -> list[Path]:
    files = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
        if blocks:
            # One module per page: later blocks use what earlier ones defined.
            path = tmp_path / f"{page.stem.lower()}_blocks.py"
            path.write_text("\n".join(blocks))
            files.append(path)
    return files


def test_users_code_type_checks(tmp_path):
    pytest.importorskip("mypy")
    uses = tmp_path / "typed_uses.py"
    uses.write_text(TYPED_USES)
    for result in (_mypy(*_snippets(tmp_path), uses), _mypy(package=True)):
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_unpacking_is_caught(tmp_path):
    """The check can fail: three names for the two results of an update
    without master copies is an error."""
    pytest.importorskip("mypy")
    wrong = tmp_path / "wrong_use.py"
    wrong.write_text(WRONG_USE)
    result = _mypy(wrong)
    assert result.returncode == 1
    assert "wrong_use.py:5" in result.stdout, result.stdout
