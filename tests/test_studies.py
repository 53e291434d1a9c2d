"""The benchmark studies (benchmarks/studies/: where the design's measured
choices come from) still run against the package as it is: each one once,
with small settings, in its own process. What each measured is in
docs/design.md and docs/benchmarks.md."""

import subprocess
import sys
from pathlib import Path

import pytest

# Once, on the CPU: each study picks its own device, in its own process.
pytestmark = pytest.mark.devices("cpu")

STUDIES = Path(__file__).resolve().parents[1] / "benchmarks" / "studies"

SMALL = {
    "chunk_sweep.py": ["--chunks", "1", "4", "--workloads", "small", "--reps", "1"],
    "colmajor_weights.py": ["--workloads", "mlp", "--reps", "1"],
    "grad_offset.py": ["1"],
    "grad_reads.py": ["--tensors", "2", "--size", "4096", "--reps", "1"],
    "host_share.py": ["--quick"],
}
# What each prints once it has measured everything.
LAST_WORDS = {
    "chunk_sweep.py": "small",
    "colmajor_weights.py": "mlp",
    "grad_offset.py": "the contiguous step",
    "grad_reads.py": "non-finite check",
    "host_share.py": "mx.eval(x + 1)",
}


def test_every_study_has_a_smoke_run():
    assert sorted(p.name for p in STUDIES.glob("*.py")) == sorted(SMALL)


@pytest.mark.parametrize("study", sorted(SMALL))
def test_study_runs(study):
    done = subprocess.run(
        [sys.executable, str(STUDIES / study), *SMALL[study]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert LAST_WORDS[study] in done.stdout, done.stdout[-2000:]
