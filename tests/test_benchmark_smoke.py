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
