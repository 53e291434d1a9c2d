"""The benchmark runs (small, quick configurations) and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

# Once, on the CPU: the benchmark runs in its own process, on the device it is given.
pytestmark = pytest.mark.devices("cpu")


ROOT = Path(__file__).resolve().parents[1]


def _run_bench(tmp_path, *args):
    """Runs benchmarks/bench.py with a quick timing configuration and
    ``args``; returns its stdout and its JSON."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench.py"),
        "--warmup",
        "1",
        "--out",
        str(tmp_path),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((tmp_path / "bench.json").read_text())


def test_benchmark_runs_and_writes_results(tmp_path):
    out, result = _run_bench(
        tmp_path,
        *("--workloads", "small", "--rounds", "2", "--reps", "2"),
        *("--impls", "fused", "stock_eager"),
    )
    assert "mlx-fused-sgd" in out
    row = result["workloads"]["small"]
    assert row["tensors"] == 1000 and row["params"] == 1024 * 1000
    assert row["fused_ms"] > 0 and row["stock_eager_ms"] > 0 and row["roofline_ms"] > 0
    for name in ("fused", "stock_eager", "roofline"):
        lo, hi = row[f"{name}_range_ms"]
        assert 0 < lo <= row[f"{name}_ms"] <= hi
        assert len(row["rounds_ms"][name]) == 2
        assert min(row["rounds_ms"][name]) == lo and max(row["rounds_ms"][name]) == hi


def test_ratios_are_taken_within_rounds():
    """fused/roofline and eager/fused are medians of per-round ratios: a
    round the machine slowed down counts for both sides of its ratio."""
    bench = _bench_module()
    row: dict = {}
    bench.summarize({"fused": [2.0, 4.0, 6.0], "roofline": [1.0, 4.0, 3.0]}, row)
    assert row["fused_ms"] / row["roofline_ms"] == pytest.approx(4 / 3)
    assert bench.paired_ratio(row, "fused", "roofline") == 2.0
    assert np.isnan(bench.paired_ratio(row, "stock_eager", "fused"))


def test_benchmark_real_model_rows(tmp_path):
    """A real model: its gradients' layouts are counted, and the training
    step is timed eager and compiled, stock and fused."""
    out, result = _run_bench(
        tmp_path,
        *("--workloads", "convnet", "--rounds", "1", "--reps", "1"),
        *("--impls", "fused", "stock_eager"),
    )
    row = result["workloads"]["convnet"]
    assert row["kind"] == "real" and row["not_row_contiguous"] >= 1
    assert row["fused_ms"] > 0 and row["stock_eager_ms"] > 0
    # The fused step taken apart: contiguous copies of the gradients, and
    # MLX's eval floor, timed in the same rounds.
    assert row["fused_contiguous_ms"] > 0 and row["eval_floor_ms"] > 0
    assert len(row["rounds_ms"]["fused_contiguous"]) == 1
    assert "taken apart" in out
    train = result["training"]["convnet"]
    for kind in ("stock_eager", "fused_eager", "stock_compiled", "fused_compiled"):
        assert train[f"{kind}_ms"] > 0, kind
    assert "Training step" in out


def test_benchmark_mlx_lm_workload(tmp_path):
    """mlx-lm's Llama with LoRA: the optimizer step on the adapters' gradients
    and mlx-lm's training step (its loss, batches and state list), stock and
    fused, eager and compiled."""
    out, result = _run_bench(
        tmp_path,
        *("--workloads", "llama-lora", "--rounds", "1", "--reps", "1"),
        *("--impls", "fused", "stock_eager"),
    )
    row = result["workloads"]["llama-lora"]
    # Only the adapters are trained: LoRA's two matrices on each of the 7
    # projections of 4 layers.
    assert row["kind"] == "real" and row["tensors"] == 56
    assert row["fused_ms"] > 0 and row["stock_eager_ms"] > 0
    train = result["training"]["llama-lora"]
    for kind in ("stock_eager", "fused_eager", "stock_compiled", "fused_compiled"):
        assert train[f"{kind}_ms"] > 0, kind
    assert "mlx-lm Llama" in out or "LoRA rank 8" in out


def test_breakdown_table_ratios_come_from_the_rounds(capsys):
    """The breakdown's ratios are per-round ratios: layout (fused over fused
    on contiguous gradients), contiguous over the roofline, and stock eager
    over the roofline."""
    bench = _bench_module()
    row: dict = {}
    bench.summarize(
        {
            "roofline": [1.0, 2.0, 4.0],
            "fused": [3.0, 3.0, 6.0],
            "fused_contiguous": [2.0, 1.0, 4.0],
            "eval_floor": [0.1, 0.1, 0.1],
            "stock_eager": [10.0, 30.0, 20.0],
        },
        row,
    )
    bench._breakdown_table({"workloads": {"m": row}}, ["m"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("m "))
    # layout: 1.5, 3, 1.5 -> 1.50; contiguous/roofline: 2, 0.5, 1 -> 1.00;
    # eager/roofline: 10, 15, 5 -> 10.0
    assert line.split("|")[-1].split() == ["1.50x", "1.00x", "10.0x"]


def test_only_the_small_real_models_are_taken_apart():
    """The breakdown's extra copies are for the real models that fit
    anywhere, not the 1B-parameter decoder or the synthetic workloads."""
    bench = _bench_module()
    assert [w for w in bench.REAL_WORKLOADS if bench.takes_apart(w)] == [
        "mlp",
        "decoder",
        "convnet",
        "llama",
        "llama-lora",
    ]
    assert not any(bench.takes_apart(w) for w in bench.SYNTHETIC_WORKLOADS)


def test_warnings_name_spread_and_steps_faster_than_the_roofline():
    """A warning for every spread past 15% and every step faster than the
    roofline, named with its table's label; none for the eval floor (a
    reference of microseconds, faster than the roofline by design)."""
    bench = _bench_module()
    step: dict = {}
    bench.summarize(
        {
            "roofline": [2.0, 2.0],
            "fused": [1.0, 1.1],  # beats the roofline
            "stock_compiled": [10.0, 20.0],  # spread
            "eval_floor": [0.01, 0.05],  # both, but a reference
        },
        step,
    )
    train: dict = {}
    bench.summarize({"stock_compiled": [10.0, 10.5], "fused_eager": [5.0, 9.0]}, train)
    out = bench._warnings({"workloads": {"m": step}, "training": {"m": train}})
    assert sorted(out) == sorted(
        [
            "m optimizer step, stock mx.compile: round medians 10.00 to 20.00 ms "
            "(67% spread)",
            "m optimizer step, mlx-fused-sgd: 1.05 ms beats the roofline 2.00 ms",
            "m training step, fused eager: round medians 5.00 to 9.00 ms (57% spread)",
        ]
    )


def test_benchmark_option_rows_run(tmp_path):
    """Every optional row (clip, loss scaling, float32 state, master weights,
    stochastic rounding) runs on bfloat16 params and is reported."""
    bench = _bench_module()
    out, result = _run_bench(
        tmp_path,
        *("--workloads", "small", "--dtype", "bfloat16", "--rounds", "1"),
        *("--reps", "1", "--impls", *bench.EXTRA_IMPLS),
    )
    row = result["workloads"]["small"]
    for impl in bench.EXTRA_IMPLS:
        assert row[f"{impl}_ms"] > 0, impl
        assert bench.LABELS[impl] in out


def test_time_steps_warms_up_for_the_time_asked():
    """After the pause between implementations each turn runs untimed steps
    for a while first (an idle CPU wakes slowly); only the reps are timed."""
    bench = _bench_module()
    calls = []

    def step():
        calls.append(None)

    times = bench.time_steps(step, 1, 3, lambda: None, min_warmup_s=0.01)
    assert len(times) == 3
    assert len(calls) > 3 + 1  # more than one untimed step in 10 ms
    calls.clear()
    assert len(bench.time_steps(step, 2, 0, lambda: None)) == 0
    assert len(calls) == 2


def _bench_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench


def test_gpu_workload_shapes_are_the_models():
    """The synthetic 1B workload has the decoder's shapes: checked on a small
    decoder built by the same factory, and the 1B size itself."""
    import math

    from mlx.utils import tree_flatten

    from mlx_fused_sgd.examples import models

    bench = _bench_module()
    small = dict(vocab=100, dims=16, heads=2, layers=3, context=8)
    model = models.gpt(**small, batch=1).model
    shapes = sorted(tuple(p.shape) for _, p in tree_flatten(model.parameters()))
    assert shapes == sorted(bench.gpt_shapes(**small))
    total = sum(math.prod(s) for s in bench.workload_shapes("gpt-1b"))
    assert 1.0e9 <= total <= 1.1e9


def test_gpu_roofline_and_torch_peers_run_where_they_can():
    """The GPU roofline's measurements (MLX's triad on the default device,
    PyTorch's device-to-device copy) and the PyTorch peers, run on the CPU
    through the code a GPU run takes."""
    bench = _bench_module()
    bw, how = bench.mlx_triad_bandwidth(n=1 << 20, reps=3)
    assert bw > 0 and "MLX triad" in how
    pytest.importorskip("torch")
    assert bench.torch_device("cpu") == "cpu"
    bw_copy, how_copy = bench.torch_copy_bandwidth("cpu", n=1 << 20, reps=3)
    assert bw_copy > 0 and "copy on cpu" in how_copy
    best = bench.device_bandwidth("gpu", "cpu", reps=3)
    assert best[1] in (how, how_copy) and best[0] > 0
    for kind in ("torch_fused", "torch_foreach"):
        step, sync = bench.torch_runner(kind, [(4, 3), (5,)], "cpu")
        step()  # one SGD step on the device given
        sync()


def test_a_torch_peer_that_fails_on_the_device_is_left_out(
    tmp_path, monkeypatch, capsys
):
    """A PyTorch whose fused SGD does not run on the device (an older one on
    MPS, say): the run says so and goes on without that row."""
    pytest.importorskip("torch")
    bench = _bench_module()
    original = bench.torch_runner

    def runner(kind, shapes, dev="cpu"):
        if kind == "torch_fused":
            raise RuntimeError("fused SGD is not supported on this device")
        return original(kind, shapes, dev)

    monkeypatch.setattr(bench, "torch_runner", runner)
    assert (
        bench.main(
            [
                *("--workloads", "small", "--rounds", "1", "--reps", "1"),
                *("--warmup", "1", "--out", str(tmp_path)),
                *("--impls", "fused", "torch_fused", "torch_foreach"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "torch fused on cpu failed: fused SGD is not supported" in captured.err
    row = json.loads((tmp_path / "bench.json").read_text())["workloads"]["small"]
    assert "torch_fused_ms" not in row and row["torch_foreach_ms"] > 0


def test_cpu_roofline_triad_runs_over_mlx_memory():
    """The CPU roofline's triad runs over buffers MLX allocated (the memory
    the optimizer works on), in place: the MLX array behind the view sees
    the triad's writes. The NumPy-memory variant is measured too."""
    bench = _bench_module()
    b, c, where = bench.triad_buffers(1 << 12, "mlx")
    assert b.flags.writeable and b.dtype == c.dtype == np.float32
    assert where == "MLX's buffers"
    n = 1 << 20
    bw, how = bench.triad_bandwidth(n=n, reps=3)
    assert bw > 0 and "MLX's buffers" in how
    b_used, c_used = bench._TRIAD[(n, "mlx")][:2]
    # b started at 1 and had 1e-3 * c (c = 1) added once per call, in the
    # MLX array's own memory (the view's buffer is exported by that array).
    assert float(b_used[0]) > 1.0 and float(c_used[0]) == 1.0
    owner = b_used.base.obj
    assert isinstance(owner, mx.array)
    assert owner[0].item() == float(b_used[0])
    bw_np, how_np = bench.triad_bandwidth(n=n, reps=3, memory="numpy")
    assert bw_np > 0 and "NumPy's buffers" in how_np
