"""The prepared GPU check (tools/gpu_check.sh) as far as a machine without a
GPU can take it: the packing that cuts MLX's CUDA wheels into parts that
each fit one transfer, the probe's checks on the CPU, and the run's phases
and output folder on the CPU. The prepared parts themselves, where this
checkout has them (``tools/gpu_check.sh prepare``), are checked complete
and within the limit."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Once, on the CPU: the GPU check's tooling, run on the CPU here.
pytestmark = pytest.mark.devices("cpu")


ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpu_pack = _load("gpu_pack")
KIB = 1024


@pytest.fixture
def files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    made = {
        "big.whl": os.urandom(500 * KIB),
        "small.whl": os.urandom(3 * KIB),
        "empty.whl": b"",
    }
    for name, data in made.items():
        (src / name).write_bytes(data)
    return [src / n for n in made]


def test_pack_cuts_files_into_parts_within_the_limit_and_back(files, tmp_path):
    limit = 200 * KIB
    manifest = gpu_pack.pack(files, tmp_path / "out", limit)
    parts = [tmp_path / "out" / p for p in manifest["parts"]]
    assert (
        len(parts) == 4
    )  # 503 KiB in parts of 136 KiB (the rest: the manifest's room)
    for part in parts:
        assert sum(f.stat().st_size for f in part.iterdir()) <= limit
        assert (part / gpu_pack.MANIFEST).exists()
    big = next(e for e in manifest["files"] if e["name"] == "big.whl")
    assert len({p["part"] for p in big["pieces"]}) >= 3
    back = gpu_pack.unpack(parts, tmp_path / "back")
    assert [p.name for p in back] == [f.name for f in files]
    for original, restored in zip(files, back):
        assert restored.read_bytes() == original.read_bytes()


def test_a_part_not_sent_is_named(files, tmp_path):
    manifest = gpu_pack.pack(files, tmp_path / "out", 200 * KIB)
    sent = [tmp_path / "out" / p for p in manifest["parts"][:-1]]
    with pytest.raises(gpu_pack.PackError, match=f"part {manifest['parts'][-1]}"):
        gpu_pack.unpack(sent, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_a_damaged_piece_is_refused(files, tmp_path):
    manifest = gpu_pack.pack(files, tmp_path / "out", 200 * KIB)
    parts = [tmp_path / "out" / p for p in manifest["parts"]]
    piece = parts[1] / manifest["files"][0]["pieces"][1]["file"]
    data = bytearray(piece.read_bytes())
    data[7] ^= 1
    piece.write_bytes(bytes(data))
    with pytest.raises(gpu_pack.PackError, match="damaged"):
        gpu_pack.verify(parts)


def test_parts_of_two_packings_are_refused(files, tmp_path):
    first = gpu_pack.pack(files, tmp_path / "one", 200 * KIB)
    files[1].write_bytes(b"changed since")
    gpu_pack.pack(files, tmp_path / "two", 200 * KIB)
    mixed = [
        tmp_path / "one" / "a",
        *(tmp_path / "two" / p for p in first["parts"][1:]),
    ]
    with pytest.raises(gpu_pack.PackError, match="different packings"):
        gpu_pack.verify(mixed)


def test_a_part_over_the_limit_is_refused(files, tmp_path):
    manifest = gpu_pack.pack(files, tmp_path / "out", 200 * KIB)
    parts = [tmp_path / "out" / p for p in manifest["parts"]]
    with pytest.raises(gpu_pack.PackError, match="over the"):
        gpu_pack.verify(parts, limit=100 * KIB)


def test_parts_built_from_other_sources_are_refused(files, tmp_path):
    repo = tmp_path / "repo"
    for name in (
        "CMakeLists.txt",
        "pyproject.toml",
        "cmake/MetalToolchain.cmake",
        "csrc/sgd_update.cpp",
        "kernels/sgd_math.h",
        "python/mlx_fused_sgd/__init__.py",
    ):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(f"// {name}\n")
    out = tmp_path / "out"
    manifest = gpu_pack.pack(files, out, 200 * KIB, source=gpu_pack.source_digest(repo))
    parts = [out / p for p in manifest["parts"]]
    gpu_pack.check_source(parts, repo)
    # The last part alone (the first was staged by an earlier call).
    gpu_pack.check_source(parts[-1:], repo)
    # Bytecode is not a source.
    cache = repo / "python/mlx_fused_sgd/__pycache__"
    cache.mkdir()
    (cache / "x.pyc").write_bytes(b"0")
    gpu_pack.check_source(parts, repo)
    (repo / "kernels/sgd_math.h").write_text("// changed\n")
    with pytest.raises(gpu_pack.PackError, match="built from other sources"):
        gpu_pack.check_source(parts, repo)
    gpu_pack.pack(files, out, 200 * KIB)
    with pytest.raises(gpu_pack.PackError, match="no source digest"):
        gpu_pack.check_source([out / "a"], repo)


def test_probe_parity_passes_and_can_fail(monkeypatch):
    """The probe's parity check on the CPU: FusedSGD against stock in float32
    and against itself; with a learning rate off by one ulp it must fail."""
    probe = _load("gpu_probe")
    import mlx.core as mx

    rows = probe.parity(mx.cpu)
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert sum(r["against"] == "stock same device" for r in rows) == len(
        probe.OPTION_SETS
    )

    import numpy as np

    step_decay = probe.mfs.step_decay

    def off_by_one_ulp(lr, *args):
        return step_decay(float(np.nextafter(np.float32(lr), np.float32(1))), *args)

    monkeypatch.setattr(probe.mfs, "step_decay", off_by_one_ulp)
    rows = probe.parity(mx.cpu)
    stock_rows = [r for r in rows if r["against"] == "stock same device"]
    assert stock_rows and not any(r["ok"] for r in stock_rows)


def _run_on_the_cpu(out: Path, **settings: str) -> subprocess.CompletedProcess:
    """``tools/gpu_check.sh run out`` on this machine's CPU (the quick probe),
    with the environment ``settings``."""
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        MFS_GPU_CHECK_DEVICE="cpu",
        MFS_GPU_CHECK_PROBE="--quick",
        **settings,
    )
    return subprocess.run(
        ["bash", str(TOOLS / "gpu_check.sh"), "run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_run_writes_few_small_files_that_come_back(tmp_path):
    """``run``'s phases on the CPU, with small settings: the output folder
    holds at most 8 files (what a borrowed GPU machine sends back), none more than 2
    folders down, each named in letters, digits, '.', '_' and '-'."""
    out = tmp_path / "out"
    small = "--workloads mlp --rounds 1 --reps 1 --warmup 1 --no-training"
    done = _run_on_the_cpu(
        out,
        MFS_GPU_CHECK_BUDGET_S="240",
        MFS_GPU_CHECK_BENCH=small,
        MFS_GPU_CHECK_BENCH_1B=small,
        MFS_GPU_CHECK_TESTS="tests/test_gpu_check.py -k damaged",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    written = {"bench/bench.json", "bench-1b/bench.json"}
    written |= {"log.txt", "probe.json", "tests.txt"}
    plots = {"bench/bench.png", "bench-1b/bench.png"}  # with matplotlib
    assert written <= found <= written | plots
    assert all(re.fullmatch(r"[A-Za-z0-9._/-]+", f) for f in found)
    assert max(f.count("/") for f in found) <= 2
    log = (out / "log.txt").read_text()
    for phase in ("environment", "probe", "bench", "tests", "bench-1b"):
        assert f"== {phase}: exit 0" in log, log[-3000:]
    assert "1 passed" in (out / "tests.txt").read_text()
    probe = json.loads((out / "probe.json").read_text())
    assert probe["parity"] and all(r["ok"] for r in probe["parity"])
    # The CPU writes a donated param in place; held inputs get new buffers.
    memory = probe["memory"]
    assert memory["fused param (inputs donated)"]["wrote_in_place"] is True
    pointers = [m["pointer"] for m in memory.values()]
    assert len(set(pointers)) == len(pointers)


def test_the_run_stops_at_its_deadline(tmp_path):
    """Each phase's time limit is cut to what is left of the run's, and the
    phases left once it is spent are skipped: the run ends inside the borrowed
    machine's window whatever hangs."""
    out = tmp_path / "out"
    done = _run_on_the_cpu(out, MFS_GPU_CHECK_BUDGET_S="14")
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "log.txt").read_text()
    assert "== tests: skipped, the run's time is spent" in log, log[-2000:]


PREPARED = ROOT / ".gpucheck"


@pytest.mark.skipif(
    not PREPARED.is_dir(), reason="no prepared parts here (tools/gpu_check.sh prepare)"
)
def test_the_prepared_parts_are_complete_and_each_fits_one_transfer():
    parts = sorted(p for p in PREPARED.iterdir() if p.is_dir())
    manifest = gpu_pack.verify(parts, limit=gpu_pack.DEFAULT_LIMIT_MIB << 20)
    names = {f["name"].split("-")[0] for f in manifest["files"]}
    assert {"mlx", "mlx_cuda_13", "nanobind", "mlx_lm", "mlx_fused_sgd"} <= names
    assert [p.name for p in parts] == manifest["parts"]
    # Built from this checkout's sources (else: prepare again).
    gpu_pack.check_source(parts, ROOT)
