"""The CUDA sources compile: ``csrc/cuda/*.cu`` (eval_gpu of every primitive,
with the kernels of ``kernels/*.cuh``) through ``nvcc`` against MLX's real
CUDA headers, as ``CMakeLists.txt`` compiles them for an MLX built with CUDA.
Skipped, with the reason, where ``nvcc``, MLX's CUDA headers or the fmt
headers they include are missing (``.ci/run`` installs fmt where ``nvcc``
is present). The kernels' arithmetic and launch logic are checked on the CPU
by ``test_cuda_harness.py``; running them needs an NVIDIA GPU.

What the compiler makes of them is checked here too, in the PTX nvcc keeps
and in ptxas's report: no multiply and add may become one FMA (stock MLX
rounds each op on its own), and no kernel spills registers to memory.
"""

import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

# Once, on the CPU: a compile check.
pytestmark = pytest.mark.devices("cpu")


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


# CMakeLists.txt's flags for csrc/cuda/*.cu: --fmad=false keeps each
# multiply and add rounded on its own; 186, an unsigned compared with 0 in a
# template; 997, MLX's UnaryPrimitive pattern (eval_cpu for one output hides
# the base's overload for many, in MLX's primitives too).
BUILD_FLAGS = [
    "-std=c++20",
    "--fmad=false",
    "-diag-suppress=186,997",
    "-DFMT_USE_CONSTEXPR=1",
]


# The build's include paths: the repository, csrc/, and MLX's headers as
# system headers (they warn under nvcc; ours must not).
INCLUDES = [f"-I{ROOT}", f"-I{ROOT / 'csrc'}", "-isystem", str(MLX_INCLUDE)]


def _nvcc_compile(
    nvcc: str,
    source: Path,
    out: Path,
    keep_dir: Path | None = None,
) -> subprocess.CompletedProcess:
    """Compiles ``source`` as CMakeLists.txt compiles csrc/cuda/*.cu; with
    ``keep_dir``, nvcc keeps each architecture's PTX there and ptxas reports
    every kernel's registers, stack frame and spills on stderr."""
    keep = (
        []
        if keep_dir is None
        else ["--keep", "--keep-dir", str(keep_dir), "-Xptxas", "-v"]
    )
    cmd = [
        nvcc,
        *BUILD_FLAGS,
        "-DMFS_CUDA_KERNELS",
        *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES],
        *keep,
        "-Werror=all-warnings",
        *INCLUDES,
        "-c",
        str(source),
        "-o",
        str(out),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(nvcc, tmp_path_factory):
    """Each source compiled once, as the build compiles it: its object, the
    PTX of every architecture, and ptxas's report."""
    results = {}
    for source in SOURCES:
        keep_dir = tmp_path_factory.mktemp(source.stem)
        out = keep_dir / (source.stem + ".o")
        results[source.name] = (
            _nvcc_compile(nvcc, source, out, keep_dir),
            out,
            keep_dir,
        )
    return results


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_against_mlx_cuda_headers(compiled, source):
    proc, out, _ = compiled[source.name]
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert out.stat().st_size > 0


# A kernel's entry in PTX, and a floating-point add, sub, mul, mad or fma (an
# instruction, after an optional predicate; not atom.add and the like).
_PTX_ENTRY = re.compile(r"^\.(?:visible |weak )?\.entry (\w+)\(", re.M)
_PTX_FLOAT_OP = re.compile(
    r"^\s*(?:@!?%\w+\s+)?(add|sub|mul|mad|fma)((?:\.\w+)*?)\.(f16x2|f16|bf16x2|bf16|f32|f64)\s",
    re.M,
)
_ROUNDING = {".rn", ".rz", ".rm", ".rp"}


def _ptx_kernels(ptx: str) -> dict[str, str]:
    """Each kernel's name and PTX body."""
    starts = list(_PTX_ENTRY.finditer(ptx))
    ends = [m.start() for m in starts[1:]] + [len(ptx)]
    return {m.group(1): ptx[m.start() : end] for m, end in zip(starts, ends)}


def contraction_hazards(ptx: str, powf_fmas: int) -> list[str]:
    """The kernels of ``ptx`` in which a multiply and an add may be, or have
    been, fused into one FMA: an add, sub or mul without a rounding modifier
    (ptxas may contract those), a mad, or FMAs other than those of CUDA's
    ``powf`` (``powf_fmas`` of them, computed with FMAs by design; a kernel
    calls it once or not at all)."""
    hazards = []
    for name, body in _ptx_kernels(ptx).items():
        fmas = 0
        for op, modifiers, dtype in _PTX_FLOAT_OP.findall(body):
            if op == "fma":
                fmas += 1
            elif op == "mad":
                hazards.append(f"{name}: mad.{dtype}")
            elif not _ROUNDING & set(re.findall(r"\.\w+", modifiers)):
                hazards.append(
                    f"{name}: {op}{modifiers}.{dtype} (no rounding modifier)"
                )
        if fmas not in (0, powf_fmas):
            hazards.append(f"{name}: {fmas} FMAs, CUDA's powf has {powf_fmas}")
    return hazards


def _ptx(nvcc: str, source: Path, tmp_path: Path, arch: str, flags: list[str]) -> str:
    out = tmp_path / f"{source.stem}.compute_{arch}.ptx"
    proc = subprocess.run(
        [nvcc, *flags, "-DMFS_CUDA_KERNELS", f"-arch=compute_{arch}", "-ptx"]
        + INCLUDES
        + [str(source), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out.read_text()


@pytest.fixture(scope="module")
def powf_fmas(nvcc, tmp_path_factory):
    """How many FMAs CUDA's powf is made of, for each architecture, compiled
    with the build's flags."""
    tmp_path = tmp_path_factory.mktemp("powf")
    source = tmp_path / "powf.cu"
    source.write_text(
        "__global__ void powf_only(float* out, float a, float b) { *out = powf(a, b); }\n"
    )
    counts = {}
    for arch in ARCHITECTURES:
        ptx = _ptx(nvcc, source, tmp_path, arch, BUILD_FLAGS)
        counts[arch] = ptx.count("fma.rn.f32")
        assert counts[arch] > 0, "powf compiled without an FMA: the reference is wrong"
    return counts


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_no_multiply_and_add_is_fused_in_the_kernels(compiled, powf_fmas, source):
    """The parity contract on the GPU: in the PTX the build makes, every
    float add, sub and mul carries its rounding (.rn), so ptxas cannot fuse
    them, and the only FMAs are CUDA's powf's (the step-decay schedule)."""
    proc, _, keep_dir = compiled[source.name]
    assert proc.returncode == 0, proc.stderr[-6000:]
    for arch in ARCHITECTURES:
        ptx = (keep_dir / f"{source.stem}.compute_{arch}.ptx").read_text()
        assert _ptx_kernels(ptx), f"no kernel in {source.name}'s PTX for compute_{arch}"
        assert contraction_hazards(ptx, powf_fmas[arch]) == [], f"compute_{arch}"


def test_the_fma_check_can_fail(nvcc, powf_fmas, tmp_path):
    """With nvcc's default (--fmad=true) the norm's `sum + x * x` becomes an
    FMA, and the check above finds it."""
    source = ROOT / "csrc" / "cuda" / "grad_check.cu"
    flags = [f for f in BUILD_FLAGS if f != "--fmad=false"] + ["--fmad=true"]
    ptx = _ptx(nvcc, source, tmp_path, ARCHITECTURES[-1], flags)
    hazards = contraction_hazards(ptx, powf_fmas[ARCHITECTURES[-1]])
    assert any("grad_read" in h and "FMAs" in h for h in hazards), hazards


# ptxas -v: "Compiling entry function '<name>' for 'sm_<arch>'", then its
# "<n> bytes stack frame, <n> bytes spill stores, <n> bytes spill loads".
_PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(\w+)' for 'sm_(\d+)'\n.*?\n\s*"
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_no_kernel_spills_registers_or_has_a_stack_frame(compiled, source):
    """A spill or a stack frame would put local-memory traffic into kernels
    that are meant to move each operand once."""
    proc, _, keep_dir = compiled[source.name]
    assert proc.returncode == 0, proc.stderr[-6000:]
    reports = _PTXAS_ENTRY.findall(proc.stderr)
    kernels = {
        arch: len(
            _ptx_kernels((keep_dir / f"{source.stem}.compute_{arch}.ptx").read_text())
        )
        for arch in ARCHITECTURES
    }
    for arch in ARCHITECTURES:
        assert sum(r[1] == arch for r in reports) == kernels[arch], f"sm_{arch}"
    costly = [r for r in reports if r[2:] != ("0", "0", "0")]
    assert costly == [], costly[:5]


def test_the_build_compiles_for_these_architectures():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    default = " ".join(
        [f"{a}-real" for a in ARCHITECTURES] + [f"{ARCHITECTURES[-1]}-virtual"]
    )
    assert f"set(CMAKE_CUDA_ARCHITECTURES {default})" in cmake


def test_the_build_compiles_with_these_flags():
    """What this file checks of nvcc's output holds for the build's own
    flags only if they are the same."""
    cmake = " ".join((ROOT / "CMakeLists.txt").read_text().split())
    options = " ".join(f for f in BUILD_FLAGS if not f.startswith("-std="))
    assert f"target_compile_options( mfs_cuda PRIVATE {options})" in cmake
    assert "set_target_properties(mfs_cuda PROPERTIES CUDA_STANDARD 20" in cmake


def test_every_launch_hands_mlx_a_driver_handle():
    """MLX's library has its own, static CUDA runtime, which cannot launch a
    kernel registered with this extension's: every launch goes through
    cuda::add_kernel (a CUfunction for MLX's encoder), none straight to the
    encoder's add_kernel_node with a kernel's address."""
    for source in SOURCES:
        text = source.read_text()
        assert "add_kernel_node" not in text, source.name
        assert "cuda::add_kernel(" in text, source.name


def test_every_launch_declares_its_own_arrays():
    """MLX's CUDA encoder makes each launch a node of a CUDA graph, with
    edges from the arrays declared since the node before it; once the node
    is added it forgets them. Arrays declared once for several launches give
    the later launches no edge to their inputs' producers, and readers of
    their outputs no edge to them. So no source declares arrays to the
    encoder itself: cuda::add_kernel takes each launch's arrays
    (cuda::LaunchArrays) and declares them right before adding it."""
    for source in SOURCES:
        text = source.read_text()
        for call in ("set_input_array", "set_output_array", "prepare_tensor"):
            assert call not in text, f"{source.name} calls {call}"
    launch = (ROOT / "csrc" / "cuda" / "launch.h").read_text()
    add_kernel = launch[launch.index("void add_kernel(") :]
    assert "const LaunchArrays& arrays," in add_kernel
    assert add_kernel.index("arrays.declare(encoder);") < add_kernel.index(
        "encoder.add_kernel_node_ex("
    )


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
        "  mlx_fused_sgd::cuda::add_kernel(\n"
        "      encoder, mlx_fused_sgd::cuda::LaunchArrays(), kernel, dim3(1), dim3(1), x);\n"
        "}\n"
    )
    proc = _nvcc_compile(nvcc, source, tmp_path / "launch.o")
    if argument == "float*":
        assert proc.returncode == 0, proc.stderr[-6000:]
    else:
        assert proc.returncode != 0
        assert "kernel parameter's type" in proc.stderr, proc.stderr[-6000:]
