#!/usr/bin/env bash
# The first run on an NVIDIA GPU, prepared here to fit one short window on a
# machine that has no MLX and reaches no package index.
#
#   prepare [DIR]    here (Linux x86-64, nvcc 13, Python 3.12): downloads
#                    MLX's CUDA wheels, builds this package's wheel with its
#                    CUDA kernels for sm_90 (H100/H200; MFS_GPU_ARCH=... for
#                    others), and packs all of it into DIR/a, DIR/b, ...
#                    (default DIR: .gpucheck), each part small enough for one
#                    transfer (60 MiB; tools/gpu_pack.py).
#   stage [DIR]      there, one call per part but the last: copies the parts
#                    sent so far into .gpucheck-cache (kept between calls).
#   run OUT [DIR]    there, with the last part: checks every piece, installs
#                    with no index into /tmp/mfs-site, then writes to OUT:
#                      log.txt       everything printed, phase by phase
#                      probe.json    parity GPU vs CPU and stock, where the
#                                    outputs' memory lives, donated vs held
#                                    step time (tools/gpu_probe.py)
#                      bench/        benchmarks/bench.py --device gpu
#                      bench-1b/     the same, on the 1B-parameter workloads
#                      tests.txt     the test suite on the GPU
#                    7 files, none over a few MB.
#   dryrun [DIR]     here: what can be checked without a GPU (see below).
#
# On a borrowed machine that takes at most 64 MiB per call beside the
# checkout, 10 minutes per command and 15 minutes in all (starts included),
# the parts travel in two calls made back to back (the machine stays warm
# between them), each part placed at the same path in the checkout there:
#   call 1: send .gpucheck/a, run: bash tools/gpu_check.sh stage
#   call 2: send .gpucheck/b, run: bash tools/gpu_check.sh run OUT
# Expected times (docs/gpu_check.md gives the reasoning): machine start
# 1-2 min; call 1 under 30 s; call 2 about 8 min: install 30 s, probe 1 min,
# bench 3 min, tests the rest up to a deadline that ends the run at 8.5 min
# (MFS_GPU_CHECK_BUDGET_S, default 510) whatever is still running.
#
# The dry run: verifies the parts (complete, within the limit with the
# repository's own files), installs them with no index into a fresh folder,
# checks that every MLX symbol the extension needs is exported by the packed
# MLX CUDA library, and runs `run`'s phases on this machine's CPU with the
# package installed in the current Python (MLX's CUDA build cannot load
# without an NVIDIA driver: it allocates managed memory when imported).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
LIMIT_MIB=60
CALL_LIMIT_MIB=64
CACHE=.gpucheck-cache
SITE=/tmp/mfs-site

die() {
  echo "gpu_check: $*" >&2
  exit 1
}

# The pins the package is built and tested with, read from pyproject.toml.
pins() {
  python3 - <<'PY'
import re
text = open("pyproject.toml").read()
def pin(name):
    found = re.search(rf'"{name}(?:\[[a-z0-9]+\])?==([0-9.]+)', text)
    if not found:
        raise SystemExit(f"gpu_check: no {name}== pin in pyproject.toml")
    return found.group(1)
print(pin("mlx"), pin("nanobind"), pin("mlx-lm"))
PY
}

python312() {
  for p in "${PYTHON312:-}" python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12; do
    [[ -n "$p" ]] && "$p" -c "import sys; assert sys.version_info[:2] == (3, 12)" \
      >/dev/null 2>&1 && { echo "$p"; return; }
  done
  die "Python 3.12 (the GPU machine's) is needed to build the wheel: set PYTHON312"
}

prepare() {
  local dir=${1:-.gpucheck} work=.gpucheck-build
  command -v nvcc >/dev/null || die "nvcc (CUDA 13) is needed to build the CUDA kernels"
  read -r mlx nanobind mlx_lm < <(pins) || exit 1
  local py
  py=$(python312) || exit 1
  mkdir -p "$work/wheels"
  rm -f "$work"/wheels/*.whl
  echo "== downloading MLX $mlx (CUDA 13), nanobind $nanobind, mlx-lm $mlx_lm (Python 3.12)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_35_x86_64 -d "$work/wheels" \
    "mlx==$mlx" "mlx-cuda-13==$mlx" "nanobind==$nanobind" "mlx-lm==$mlx_lm" ||
    die "download failed"
  if [[ ! -x "$work/venv/bin/python" ]]; then
    echo "== a Python 3.12 build environment with MLX's CUDA build"
    "$py" -m venv "$work/venv" || die "venv failed"
    "$work/venv/bin/pip" install -q "mlx[cuda13]==$mlx" "nanobind==$nanobind" \
      scikit-build-core cmake ninja || die "build environment failed"
  fi
  local cudnn
  cudnn=$("$work/venv/bin/python" -c "import nvidia.cudnn as c; print(c.__path__[0])") ||
    die "cuDNN (a dependency of MLX's CUDA wheel) is missing from $work/venv"
  echo "== building mlx-fused-sgd for ${MFS_GPU_ARCH:-90-real} (a few minutes)"
  CMAKE_ARGS="-DMFS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${MFS_GPU_ARCH:-90-real} \
-DCUDNN_INCLUDE_PATH=$cudnn/include -DCUDNN_LIBRARY_PATH=$cudnn/lib" \
    "$work/venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$work/wheels" . ||
    die "the build failed"
  echo "== packing into $dir"
  python3 tools/gpu_pack.py pack --limit-mib "$LIMIT_MIB" --source-root . --out "$dir" \
    "$work"/wheels/*.whl ||
    exit 1
  local parts
  parts=$(ls "$dir")
  echo "Prepared. On the GPU machine, back to back (each part at the same path):"
  local last
  last=$(echo "$parts" | tail -1)
  for p in $parts; do
    if [[ "$p" == "$last" ]]; then
      echo "  send $dir/$p, run: bash tools/gpu_check.sh run OUT $dir"
    else
      echo "  send $dir/$p, run: bash tools/gpu_check.sh stage $dir"
    fi
  done
}

stage() {
  local dir=${1:-.gpucheck}
  mkdir -p "$CACHE"
  local n=0
  for part in "$dir"/*/; do
    cp "$part"* "$CACHE"/ && n=$((n + 1))
  done
  [[ $n -gt 0 ]] || die "no part found in $dir: send one"
  ls -l "$CACHE"
}

# Runs one phase with its own time limit, its output appended to the log.
phase() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  [[ $limit -gt $left ]] && limit=$left
  if [[ $limit -le 10 ]]; then
    echo "== $name: skipped, the run's time is spent" | tee -a "$LOG"
    return 0
  fi
  echo "== $name (at most ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  return 0
}

install_parts() {
  local dir=$1
  local sources=("$CACHE")
  for part in "$dir"/*/; do sources+=("$part"); done
  rm -rf /tmp/mfs-wheels "$SITE"
  python3 tools/gpu_pack.py unpack "${sources[@]}" --out /tmp/mfs-wheels || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    /tmp/mfs-wheels/*.whl || return 1
  # MLX's library finds NVIDIA's libraries beside it (its RPATH), as in a
  # pip install: point there at the machine's own (PyTorch's CUDA 13 ones).
  local nv
  nv=$(python3 -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))") ||
    return 1
  ln -sfn "$nv/nvidia" "$SITE/nvidia"
  echo "installed into $SITE; NVIDIA libraries from $nv/nvidia"
}

run() {
  local out=${1:?run OUT [DIR]} dir=${2:-.gpucheck}
  local device=${MFS_GPU_CHECK_DEVICE:-gpu}
  mkdir -p "$out"
  LOG=$out/log.txt
  : >"$LOG"
  DEADLINE=$(($(date +%s) + ${MFS_GPU_CHECK_BUDGET_S:-510}))
  if [[ "$device" == gpu ]]; then
    # Before anything else: parts built from other sources would spend the
    # window checking old kernels.
    python3 tools/gpu_pack.py check-source --root . "$dir"/*/ >>"$LOG" 2>&1 || {
      tail -1 "$LOG"
      die "stale parts (log: $LOG)"
    }
    echo "== install" | tee -a "$LOG"
    install_parts "$dir" >>"$LOG" 2>&1 || {
      tail -5 "$LOG"
      die "install failed (log: $LOG)"
    }
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    {
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      nvcc --version | tail -2
    } >>"$LOG" 2>&1
  fi
  export PYTHONUNBUFFERED=1
  phase environment 60 python3 -c "import json, mlx.core as mx, mlx_fused_sgd as m
print('MLX', mx.__version__, 'gpu available:', mx.is_available(mx.gpu))
print(json.dumps(m.backend_info(), indent=1, default=str))"
  # shellcheck disable=SC2086  # the option strings are word lists
  phase probe 120 python3 tools/gpu_probe.py --device "$device" --out "$out/probe.json" \
    ${MFS_GPU_CHECK_PROBE:-}
  phase bench 180 python3 benchmarks/bench.py --device "$device" --out "$out/bench" \
    ${MFS_GPU_CHECK_BENCH:-}
  local xdist=()
  if python3 -c "import xdist" 2>/dev/null; then xdist=(-n "${MFS_GPU_CHECK_WORKERS:-8}"); fi
  phase tests 300 env MFS_TEST_DEVICES="$device" python3 -m pytest -q -rfEs \
    -p no:cacheprovider "${xdist[@]}" ${MFS_GPU_CHECK_TESTS:-tests} -o console_output_style=count
  # the test phase's output, on its own for reading
  sed -n '/^== tests (/,/^== tests: exit/p' "$LOG" >"$out/tests.txt"
  phase bench-1b 120 python3 benchmarks/bench.py --device "$device" --out "$out/bench-1b" \
    ${MFS_GPU_CHECK_BENCH_1B:---workloads decoder-1b gpt-1b --rounds 3}
  echo "== done; files in $out:" | tee -a "$LOG"
  (cd "$out" && find . -type f -printf '%p %s\n') | tee -a "$LOG"
}

dryrun() {
  local dir=${1:-.gpucheck}
  [[ -d "$dir" ]] || die "$dir is missing: run 'tools/gpu_check.sh prepare' first"
  python3 -c "import mlx_fused_sgd" 2>/dev/null ||
    die "run the dry run where the package is installed (the README's test install)"
  local repo_kib part_mib
  repo_kib=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- | tail -1 | cut -f1)
  echo "== the repository's own files travel too: ${repo_kib} KiB"
  for part in "$dir"/*/; do
    part_mib=$(du -sm "$part" | cut -f1)
    echo "   $part: ${part_mib} MiB"
    [[ $((part_mib + repo_kib / 1024 + 1)) -le $CALL_LIMIT_MIB ]] ||
      die "$part with the repository is over the ${CALL_LIMIT_MIB} MiB a call carries"
  done
  python3 tools/gpu_pack.py verify "$dir"/*/ --limit-mib "$LIMIT_MIB" || exit 1
  python3 tools/gpu_pack.py check-source --root . "$dir"/*/ || exit 1
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  echo "== unpacking and installing with no index into a fresh folder"
  python3 tools/gpu_pack.py unpack "$dir"/*/ --out "$tmp/wheels" >/dev/null || exit 1
  "$(python312)" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" \
    "$tmp"/wheels/*.whl || die "install failed"
  local ext lib missing needed
  ext=$(ls "$tmp"/site/mlx_fused_sgd/_ext*.so) || die "the extension is not in the wheel"
  lib=$tmp/site/mlx/lib/libmlx.so
  [[ -f "$lib" ]] || die "MLX's library is not in the packed wheels"
  needed=$(nm -D --undefined-only "$ext" | awk '{print $2}' | grep 3mlx | sort -u)
  [[ -n "$needed" ]] || die "the extension takes no symbol from MLX: is it this package's?"
  missing=$(comm -23 <(echo "$needed") <(nm -D --defined-only "$lib" | awk '{print $3}' | sort -u))
  [[ -z "$missing" ]] || die "symbols the extension needs that MLX's CUDA library lacks: $missing"
  echo "   the $(echo "$needed" | wc -l) MLX symbols the extension needs are exported by the packed libmlx"
  local cuobjdump
  cuobjdump=$(dirname "$(readlink -f "$(command -v nvcc)")")/cuobjdump
  if [[ -x "$cuobjdump" ]]; then
    echo "   GPU code in the extension: $("$cuobjdump" --list-elf "$ext" |
      grep -o 'sm_[0-9a-z]*' | sort | uniq -c | xargs) (kernels per architecture)"
  else
    echo "   (no cuobjdump beside nvcc: the GPU code's architectures are not listed)"
  fi
  # NVIDIA's libraries beside MLX, as run() links the machine's own.
  local nv=.gpucheck-build/venv/lib/python3.12/site-packages/nvidia
  [[ -d "$nv" ]] && ln -s "$(readlink -f "$nv")" "$tmp/site/nvidia"
  echo "== import of the CUDA build (needs an NVIDIA driver: expected to stop there)"
  (cd "$tmp" && PYTHONPATH="$tmp/site" "$(python312)" -c "import mlx_fused_sgd" 2>&1 | tail -1)
  echo "== the run's phases, on this machine's CPU"
  MFS_GPU_CHECK_DEVICE=cpu MFS_GPU_CHECK_BUDGET_S=${MFS_GPU_CHECK_BUDGET_S:-300} \
    MFS_GPU_CHECK_PROBE=--quick \
    MFS_GPU_CHECK_BENCH="--workloads mlp --rounds 1 --reps 1 --warmup 1 --no-training" \
    MFS_GPU_CHECK_BENCH_1B="--workloads mlp --rounds 1 --reps 1 --warmup 1 --no-training" \
    MFS_GPU_CHECK_TESTS="${MFS_GPU_CHECK_TESTS:-tests/test_functional.py}" \
    run "$tmp/out" "$dir"
  python3 - "$tmp/out" <<'PY' || exit 1
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
files = [p for p in out.rglob("*") if p.is_file()]
bad = [p for p in files if not re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
       or len(p.relative_to(out).parts) > 3 or p.stat().st_size > 16 << 20]
assert len(files) <= 8, f"{len(files)} files: at most 8 come back"
assert not bad, f"would not come back: {bad}"
print(f"   {len(files)} files, each within what comes back")
PY
}

cmd=${1:-}
shift || true
case "$cmd" in
prepare) prepare "$@" ;;
stage) stage "$@" ;;
run) run "$@" ;;
dryrun) dryrun "$@" ;;
*)
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
