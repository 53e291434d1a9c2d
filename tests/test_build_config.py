"""The Mac build's decisions, checked on Linux: the Metal toolchain probe and
what the build does without it (cmake/MetalToolchain.cmake, run in CMake's
script mode with a fake xcrun), the metallib's deployment target and
language, the kernels' refusal of an older Metal, and the choice between the
Metal kernels and the composed fallback when the metallib does not load
(the decision with a simulated load)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import mlx_fused_sgd as mfs
from mlx_fused_sgd import _ext
from mlx_fused_sgd._build_info import MLX_BUILD_CUDA

# Once, on the CPU: the build and its configuration do not depend on the device.
pytestmark = pytest.mark.devices("cpu")


ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "cmake" / "MetalToolchain.cmake"
SCRIPT = ROOT / "tests" / "cmake" / "metal_decision.cmake"

NO_METAL = (
    'xcrun: error: unable to find utility "metal", not a developer tool or in PATH'
)


def _fake_xcrun(tmp_path: Path, found: bool) -> Path:
    xcrun = tmp_path / "xcrun"
    if found:
        body = 'echo "/Applications/Xcode.app/Contents/Developer/usr/bin/metal"\n'
    else:
        body = f"echo '{NO_METAL}' >&2\nexit 72\n"
    xcrun.write_text("#!/bin/sh\n" + body)
    xcrun.chmod(0o755)
    return xcrun


def _decide(tmp_path: Path, found: bool, require: bool):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is a test dependency (pip install '.[test]')")
    return subprocess.run(
        [
            cmake,
            f"-DMODULE={MODULE}",
            f"-DMFS_XCRUN={_fake_xcrun(tmp_path, found)}",
            f"-DREQUIRE={'ON' if require else 'OFF'}",
            "-P",
            str(SCRIPT),
        ],
        capture_output=True,
        text=True,
    )


def test_with_the_metal_compiler_the_kernels_are_built(tmp_path):
    proc = _decide(tmp_path, found=True, require=True)
    assert proc.returncode == 0, proc.stderr
    assert "MODE=metallib" in proc.stdout
    assert "TARGET=14.0 LANGUAGE=-std=metal3.1" in proc.stdout
    assert "Warning" not in proc.stderr


def test_without_it_a_warning_names_both_fixes(tmp_path):
    proc = _decide(tmp_path, found=False, require=False)
    assert proc.returncode == 0, proc.stderr
    assert "MODE=no-metallib" in proc.stdout
    warning = " ".join(proc.stderr.split())
    assert "CMake Warning" in proc.stderr
    assert NO_METAL in warning  # what xcrun said
    assert "sudo xcode-select -s /Applications/Xcode.app" in warning
    assert "xcodebuild -downloadComponent MetalToolchain" in warning
    assert "backend_info()" in warning


def test_require_metal_makes_it_an_error(tmp_path):
    proc = _decide(tmp_path, found=False, require=True)
    assert proc.returncode != 0
    assert "CMake Error" in proc.stderr
    assert "MFS_REQUIRE_METAL" in " ".join(proc.stderr.split())


def test_the_metallib_is_built_for_macos_14_and_metal_3_1():
    """The metallib call passes the module's deployment target and language
    (the values themselves are checked through the module above), and the
    missing-toolchain build defines what eval_gpu and backend_info read."""
    cmakelists = " ".join((ROOT / "CMakeLists.txt").read_text().split())
    call = re.search(r"mlx_build_metallib\((.*?)\)", cmakelists).group(1)
    assert "DEPLOYMENT_TARGET ${MFS_METAL_DEPLOYMENT_TARGET}" in call
    assert "COMPILE_OPTIONS ${MFS_METAL_LANGUAGE}" in call
    assert "option(MFS_REQUIRE_METAL" in cmakelists
    assert "MFS_HAVE_METALLIB" in cmakelists
    assert "MFS_METAL_TOOLCHAIN_MISSING" in cmakelists


@pytest.mark.parametrize("version, ok", [(310, True), (320, True), (300, False)])
def test_the_kernels_refuse_metal_older_than_3_1(tmp_path, version, ok):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    probe = tmp_path / "probe.cpp"
    # The Linux model of <metal_stdlib> (tests/metal_shim) at this version.
    probe.write_text(
        f'#include "metal_stdlib"\n#undef __METAL_VERSION__\n'
        f"#define __METAL_VERSION__ {version}\n"
        '#include "kernels/sgd_math.h"\n'
    )
    proc = subprocess.run(
        [
            cxx,
            "-std=c++20",
            "-fsyntax-only",
            f"-I{ROOT / 'tests' / 'metal_shim'}",
            f"-I{ROOT}",
            str(probe),
        ],
        capture_output=True,
        text=True,
    )
    assert (proc.returncode == 0) == ok, proc.stderr[-2000:]
    if not ok:
        assert "need Metal 3.1 or later" in proc.stderr


def test_a_metallib_that_does_not_load_sends_the_gpu_to_the_fallback():
    error = "library is using language version 3.2 which is not supported on this OS"
    path = "/site-packages/mlx_fused_sgd/mlx_fused_sgd.metallib"
    status = _ext._decide_gpu_kernels(True, path, error, "unused")
    assert status["fused"] is False
    assert status["library"] == path
    assert error in status["reason"] and path in status["reason"]
    assert "Reinstall" in status["reason"]


def test_a_metallib_that_loads_runs_the_kernels():
    status = _ext._decide_gpu_kernels(True, "/x/mlx_fused_sgd.metallib", None, "")
    assert status == {
        "fused": True,
        "library": "/x/mlx_fused_sgd.metallib",
        "reason": None,
    }


def test_a_build_without_kernels_says_why():
    status = _ext._decide_gpu_kernels(False, "/x/lib.metallib", None, "no compiler")
    assert status == {"fused": False, "library": None, "reason": "no compiler"}


def test_backend_info_on_this_machine():
    info = mfs.backend_info()
    assert info["cpu"] == {
        "available": True,
        "kernels": "fused",
        "isa": _ext.cpu_isa(),
        "reason": None,
    }
    gpu = info["gpu"]
    assert set(gpu) == {"available", "backend", "kernels", "library", "reason"}
    if not gpu["available"]:
        assert gpu["kernels"] is None and gpu["reason"]
    else:
        assert gpu["kernels"] in ("fused", "fallback")
        assert (gpu["kernels"] == "fallback") == (gpu["reason"] is not None)
    # This build's own decision: with the CUDA kernels, fused; without them
    # or Metal kernels, never fused, with a reason a user can act on.
    status = _ext.gpu_kernel_status()
    if MLX_BUILD_CUDA:
        assert status["fused"] is True and status["reason"] is None
    elif not (
        ROOT / "python" / "mlx_fused_sgd" / "mlx_fused_sgd.metallib"
    ).exists() and (
        not (Path(mfs.__file__).parent / "mlx_fused_sgd.metallib").exists()
    ):
        assert status["fused"] is False and status["reason"]


def test_the_ci_job_on_hosted_macs_checks_what_it_can():
    """Hosted macOS runners have a paravirtual GPU: that job builds the wheel
    with a pinned Xcode, checks the metallib is in it and loads, and runs the
    CPU tests; the full GPU suite and benchmark run on self-hosted Apple
    silicon, by hand or by label."""
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "xcode-select -s /Applications/Xcode_" in workflow
    assert "mlx_fused_sgd.metallib" in workflow
    assert "backend_info()" in workflow
    assert "[self-hosted, macOS, ARM64]" in workflow
    assert "workflow_dispatch" in workflow
    assert "--device gpu" in workflow
    assert os.path.basename(__file__) not in workflow
