"""The benchmark runs (a small, quick configuration) and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_and_writes_results(tmp_path, device):
    if device != "cpu":
        pytest.skip("one run is enough")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench.py"),
        "--workloads",
        "small",
        "--reps",
        "2",
        "--warmup",
        "1",
        "--impls",
        "fused",
        "stock_eager",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mlx-fused-sgd" in proc.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    row = result["workloads"]["small"]
    assert row["tensors"] == 1000 and row["params"] == 1024 * 1000
    assert row["fused_ms"] > 0 and row["stock_eager_ms"] > 0 and row["roofline_ms"] > 0


def test_benchmark_option_rows_run(tmp_path, device):
    """Every optional row (clip, loss scaling, float32 state, master weights,
    stochastic rounding) runs on bfloat16 params and is reported."""
    if device != "cpu":
        pytest.skip("one run is enough")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench.py"),
        "--workloads",
        "small",
        "--dtype",
        "bfloat16",
        "--reps",
        "1",
        "--warmup",
        "1",
        "--impls",
        *bench.EXTRA_IMPLS,
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "bench.json").read_text())["workloads"]["small"]
    for impl in bench.EXTRA_IMPLS:
        assert row[f"{impl}_ms"] > 0, impl
        assert bench.LABELS[impl] in proc.stdout
