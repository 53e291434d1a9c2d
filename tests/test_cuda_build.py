"""The CUDA sources compile: ``csrc/cuda/*.cu`` (eval_gpu of every primitive,
with the kernels of ``kernels/*.cuh``) through ``nvcc`` against MLX's real
CUDA headers, as ``CMakeLists.txt`` compiles them for an MLX built with CUDA.
Skipped, with the reason, where ``nvcc``, MLX's CUDA headers or the fmt
headers they include are missing (``.ci/run`` installs fmt where ``nvcc``
is present). The kernels' arithmetic and launch logic are checked on the CPU
by ``test_cuda_harness.py``; running them needs an NVIDIA GPU.
"""

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MLX_INCLUDE = Path(mx.__file__).resolve().parent / "include"
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# The GPUs the build compiles machine code for (CMakeLists.txt's default),
# from the oldest MLX's CUDA wheel has code for (sm_75); PTX of the newest.
ARCHITECTURES = ["75", "80", "90"]


def _fmt_available(nvcc: str) -> bool:
    probe = subprocess.run(
        [nvcc, "-E", "-x", "cu", "-", "-o", "/dev/null"],
        input="#include <fmt/format.h>\n",
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def nvcc():
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc is not installed: the CUDA sources are not compiled here")
    if not (MLX_INCLUDE / "mlx" / "backend" / "cuda" / "device.h").exists():
        pytest.skip(f"MLX's CUDA headers are not in {MLX_INCLUDE}")
    if not _fmt_available(path):
        pytest.skip(
            "the fmt headers (Debian: libfmt-dev) that MLX's CUDA headers include are missing"
        )
    return path


def test_there_is_a_cuda_source_per_primitive():
    assert [p.name for p in SOURCES] == [
        "grad_check.cu",
        "sgd_update.cu",
        "step_decay.cu",
    ]


def _nvcc_compile(nvcc: str, source: Path, out: Path) -> subprocess.CompletedProcess:
    """Compiles ``source`` as CMakeLists.txt compiles csrc/cuda/*.cu."""
    cmd = [
        nvcc,
        "-std=c++20",
        "--fmad=false",
        # As CMakeLists.txt: 186, an unsigned compared with 0 in a template;
        # 997, MLX's UnaryPrimitive pattern (eval_cpu for one output hides
        # the base's overload for many, in MLX's primitives too).
        "-diag-suppress=186,997",
        "-DFMT_USE_CONSTEXPR=1",
        "-DMFS_CUDA_KERNELS",
        *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES],
        "-Werror=all-warnings",
        f"-I{ROOT}",
        f"-I{ROOT / 'csrc'}",
        # MLX's headers warn under nvcc; ours must not.
        "-isystem",
        str(MLX_INCLUDE),
        "-c",
        str(source),
        "-o",
        str(out),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_against_mlx_cuda_headers(nvcc, source, tmp_path):
    out = tmp_path / (source.stem + ".o")
    proc = _nvcc_compile(nvcc, source, out)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert out.stat().st_size > 0


def test_the_build_compiles_for_these_architectures():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    default = " ".join(
        [f"{a}-real" for a in ARCHITECTURES] + [f"{ARCHITECTURES[-1]}-virtual"]
    )
    assert f"set(CMAKE_CUDA_ARCHITECTURES {default})" in cmake


def test_every_launch_hands_mlx_a_driver_handle():
    """MLX's library has its own, static CUDA runtime, which cannot launch a
    kernel registered with this extension's: every launch goes through
    cuda::add_kernel (a CUfunction for MLX's encoder), none straight to the
    encoder's add_kernel_node with a kernel's address."""
    for source in SOURCES:
        text = source.read_text()
        assert "add_kernel_node" not in text, source.name
        assert "cuda::add_kernel(" in text, source.name


@pytest.mark.parametrize("argument", ["float*", "int*"])
def test_a_launch_argument_must_have_its_parameters_type(nvcc, tmp_path, argument):
    """The encoder passes each argument by its address and the kernel reads
    it as its parameter's type: an argument of another type does not
    compile (the pointer to const and to mutable data excepted)."""
    source = tmp_path / "launch.cu"
    source.write_text(
        '#include "cuda/launch.h"\n'
        "__global__ void kernel(const float* x) {}\n"
        "void launch(mlx::core::cu::CommandEncoder& encoder, "
        f"{argument} x) {{\n"
        "  mlx_fused_sgd::cuda::add_kernel(encoder, kernel, dim3(1), dim3(1), x);\n"
        "}\n"
    )
    proc = _nvcc_compile(nvcc, source, tmp_path / "launch.o")
    if argument == "float*":
        assert proc.returncode == 0, proc.stderr[-6000:]
    else:
        assert proc.returncode != 0
        assert "kernel parameter's type" in proc.stderr, proc.stderr[-6000:]
