"""Build and install facts: pins, the import-time MLX check, RPATH."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_fused_sgd as mfs

from helpers import pyproject

# Once, on the CPU: what is built and installed does not depend on the device.
pytestmark = pytest.mark.devices("cpu")


ROOT = Path(__file__).resolve().parents[1]


def _pins(requirements, name):
    pins = set()
    for req in requirements:
        m = re.match(rf"{name}(\[\w+\])?==([\w.]+)", req)
        if m:
            pins.add(m.group(2))
    return pins


def test_build_and_runtime_pin_the_same_mlx():
    cfg = pyproject()
    build = _pins(cfg["build-system"]["requires"], "mlx")
    runtime = _pins(cfg["project"]["dependencies"], "mlx")
    assert len(build) == 1 and build == runtime, (build, runtime)
    assert mx.__version__ in build
    assert mfs._ext.mlx_build_version == mx.__version__


def test_nanobind_is_pinned():
    cfg = pyproject()
    build = _pins(cfg["build-system"]["requires"], "nanobind")
    assert len(build) == 1
    # The tests' stubgen (test_committed_stubs_match_the_extension) is the
    # build's nanobind.
    assert _pins(cfg["project"]["optional-dependencies"]["test"], "nanobind") == build


def test_import_refuses_a_different_mlx():
    code = "import mlx.core as mx; mx.__version__ = '0.0.1'\nimport mlx_fused_sgd\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "0.0.1" in proc.stderr and mfs._ext.mlx_build_version in proc.stderr
    # The advice must work: match the MLX, or rebuild against the installed
    # one without build isolation (an isolated rebuild pins the old MLX).
    # On Linux the backend library comes from MLX's extra: plain mlx==X
    # would leave the old release's library in place.
    version = mfs._ext.mlx_build_version
    if sys.platform.startswith("linux"):
        backend = "cuda13" if mfs._mlx_cuda_distribution() else "cpu"
        assert f'pip install "mlx[{backend}]=={version}"' in proc.stderr
    else:
        assert f'pip install "mlx=={version}"' in proc.stderr
    assert "--no-build-isolation" in proc.stderr
    rebuild = next(
        line for line in proc.stderr.splitlines() if "--force-reinstall" in line
    )
    assert "--no-build-isolation" in rebuild and "--no-deps" in rebuild


def _import_as_cuda_build(site: Path) -> subprocess.CompletedProcess:
    """Import the package as if built with the CUDA kernels, with ``site``
    (a fake installed MLX CUDA package) first on the path."""
    code = (
        "import sys, types, mlx.core as mx\n"
        "info = types.ModuleType('mlx_fused_sgd._build_info')\n"
        "info.MLX_BUILD_VERSION = mx.__version__\n"
        "info.MLX_BUILD_CUDA = True\n"
        "sys.modules['mlx_fused_sgd._build_info'] = info\n"
        "import mlx_fused_sgd\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *sys.path]))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )


def test_import_refuses_a_cuda_build_without_mlx_cuda(tmp_path):
    """An extension built with the CUDA kernels, imported with an MLX that
    is not MLX's CUDA build, is refused with the ways out (not a failure on
    missing symbols)."""
    if mfs._mlx_cuda_distribution() is not None:
        pytest.skip("MLX's CUDA build is installed here: nothing to refuse")
    proc = _import_as_cuda_build(tmp_path)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "CUDA kernels" in proc.stderr
    assert 'pip install "mlx[cuda13]==' in proc.stderr
    assert "--no-build-isolation" in proc.stderr
    # The build this suite runs on records its own kind.
    from mlx_fused_sgd import _build_info

    assert _build_info.MLX_BUILD_CUDA is False


@pytest.mark.parametrize("replaced", [False, True], ids=["intact", "replaced"])
def test_import_refuses_a_replaced_mlx_cuda_library(tmp_path, replaced):
    """mlx-cpu and mlx-cuda-13 install the same mlx/lib/libmlx.so: when the
    CUDA package's file was overwritten (the last one installed wins), an
    extension built with the CUDA kernels is refused with the way back."""
    dist = tmp_path / "mlx_cuda_13-0.32.4.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mlx-cuda-13\nVersion: 0.32.4\n"
    )
    (dist / "RECORD").write_text(
        "mlx/lib/libmlx.so,sha256=x,1000\nmlx_cuda_13-0.32.4.dist-info/RECORD,,\n"
    )
    (tmp_path / "mlx" / "lib").mkdir(parents=True)
    (tmp_path / "mlx" / "lib" / "libmlx.so").write_bytes(
        b"\0" * (10 if replaced else 1000)
    )
    proc = _import_as_cuda_build(tmp_path)
    if not replaced:
        # Past the check, the extension (this suite's CPU build) loads.
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert str(tmp_path / "mlx" / "lib" / "libmlx.so") in proc.stderr
    assert "pip uninstall mlx-cpu" in proc.stderr
    assert 'pip install --force-reinstall --no-deps "mlx-cuda-13==0.32.4"' in (
        proc.stderr
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF only")
def test_extension_finds_libmlx_through_its_rpath():
    ext = Path(mfs._ext.__file__)
    try:
        dyn = subprocess.run(
            ["readelf", "-d", str(ext)], capture_output=True, text=True, check=True
        ).stdout
    except (FileNotFoundError, subprocess.CalledProcessError):
        pytest.skip("readelf not available")
    assert "$ORIGIN/../mlx/lib" in dyn
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH",)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlx_fused_sgd, mlx.core as mx; print(mlx_fused_sgd.step_decay(0.1, 0.9, 10)(mx.array(20)))",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "0.081" in proc.stdout


def test_type_stubs_are_shipped():
    pkg = Path(mfs.__file__).parent
    assert (pkg / "py.typed").exists()
    stub = (pkg / "_ext.pyi").read_text()
    for name in ["step_decay_lr", "sgd_update", "grads_nonfinite", "grads_sq_norm"]:
        assert f"def {name}(" in stub
    assert "class SGDSettings:" in stub


def test_committed_stubs_match_the_extension(tmp_path):
    """The type stubs are kept in the source tree, because generating them
    imports the extension, which MLX's CUDA build allows only where an NVIDIA
    driver is: nanobind's stubgen, run on the installed extension, must
    write them as committed."""
    nanobind = pytest.importorskip("nanobind")
    (pinned,) = _pins(pyproject()["build-system"]["requires"], "nanobind")
    if nanobind.__version__ != pinned:
        pytest.skip(f"nanobind {nanobind.__version__}'s stubgen, not {pinned}'s")
    fresh = tmp_path / "_ext.pyi"
    subprocess.run(
        [sys.executable, "-m", "nanobind.stubgen", "-q", "-m", "mlx_fused_sgd._ext"]
        + ["-o", str(fresh)],
        check=True,
        cwd=tmp_path,
    )
    package = ROOT / "python" / "mlx_fused_sgd"
    assert fresh.read_text() == (package / "_ext.pyi").read_text(), (
        "the bindings changed: regenerate the stubs with `python -m "
        "nanobind.stubgen -q -m mlx_fused_sgd._ext -o python/mlx_fused_sgd/_ext.pyi`"
    )
    assert (package / "py.typed").exists()
