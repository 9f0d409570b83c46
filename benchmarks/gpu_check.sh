#!/usr/bin/env bash
# GPU check: the CUDA variants of the three benchmarks, with small step counts (about 4 minutes,
# at most 8, on one H100). Run it as is on a machine with a GPU:
#
#     bash benchmarks/gpu_check.sh                  # logs to $OUT/ when OUT is set, else a temp folder
#
# It installs nothing unless needed:
#   * torch not importable -> a venv .venv-gpu with `pip install -r requirements.lock` (needs PyPI);
#   * other modules missing and wheels in .whl/ -> `pip install --no-index --target /tmp/ll-site`.
# liverlesion itself is used from src/ (PYTHONPATH), not installed.
#
# Lent GPU machines cannot reach PyPI and lack SimpleITK, pydicom, nibabel and grad-cam (they
# have torch, timm, lightning, onnx, onnxruntime). Without them bench_predict still runs, minus
# the CLI and Grad-CAM rows. To get those rows, fetch wheels for the machine's Python (3.12) here
# first, then carry .whl to the machine (about 60 MB):
#
#     bash benchmarks/gpu_check.sh --fetch-wheels   # on a machine with PyPI; writes .whl/
#
# No pass/fail: the benchmarks print figures; the script's exit code is non-zero only when a
# benchmark crashed or ran past its time limit.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # Wheels for CPython 3.12 on x86-64 Linux, the Python of the lent GPU machines.
    mkdir -p .whl
    grep -qs '^/.whl/$' .git/info/exclude || echo "/.whl/" >>.git/info/exclude
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64 --platform any)
    get() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d .whl "$1"; }
    pin() { grep -i "^$1==" requirements.lock | head -1; }
    for name in SimpleITK pydicom nibabel; do get "$(pin "$name")" || exit 1; done
    get ttach==0.0.3 || exit 1
    # grad-cam is published as a source archive only; it is pure Python, so build its wheel here.
    "$PY" -m pip wheel -q --no-deps -w .whl "$(pin grad-cam)" || exit 1
    ls -l .whl
    echo "now carry .whl: run(command='bash benchmarks/gpu_check.sh', carry=['.whl'])"
    exit 0
fi

LOG_DIR=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$LOG_DIR"
T_START=$(date +%s)

# 1. A Python with torch.
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: torch is not importable with $PY; installing requirements.lock into .venv-gpu"
    if [[ ! -x .venv-gpu/bin/python ]]; then
        "$PY" -m venv .venv-gpu && .venv-gpu/bin/pip install -q -r requirements.lock || {
            echo "gpu_check: could not install requirements.lock (no PyPI here?); give PYTHON=/path/to/python with torch" >&2
            exit 1
        }
    fi
    PY=$REPO/.venv-gpu/bin/python
fi

# 2. Other modules: from carried wheels when some are missing.
MODULES="timm lightning torchvision onnx onnxruntime yaml pandas scipy typer tqdm matplotlib SimpleITK pydicom nibabel pytorch_grad_cam"
missing() {
    "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
MISSING=$(missing $MODULES)
if [[ -n "$MISSING" ]] && compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check: missing $MISSING; installing the carried wheels in .whl/ into /tmp/ll-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ll-site .whl/*.whl &&
        export PYTHONPATH=/tmp/ll-site${PYTHONPATH:+:$PYTHONPATH}
    MISSING=$(missing $MODULES)
fi
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
[[ -n "$MISSING" ]] && echo "gpu_check: still missing: $MISSING (rows that need them are skipped)"

# 3. The machine.
{
    nvidia-smi || echo "nvidia-smi not found"
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$LOG_DIR/nvidia-smi.txt"
DRY=${GPU_CHECK_DRY_RUN:-0}  # 1: run the plumbing on a CPU with --quick (to test this script)
if [[ "$DRY" != 1 ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: torch sees no CUDA device; nothing to check here" >&2
    exit 1
fi

# 4. The benchmarks (each under its own time limit, so the whole stays under 8 minutes).
STATUS=0
bench() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name ($(($(date +%s) - T_START)) s elapsed; limit ${limit} s): $PY $*"
    timeout "$limit" "$PY" "$@" --json "$LOG_DIR/$name.json" 2>&1 | tee "$LOG_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    if [[ $rc -ne 0 ]]; then
        echo "gpu_check: $name exited with $rc (124: past its ${limit} s limit)" | tee -a "$LOG_DIR/$name.txt"
        STATUS=1
    fi
}
if [[ "$DRY" == 1 ]]; then
    TRAIN=(--device cpu --quick) PREDICT=(--device cpu --quick) EXPORT=(--device cpu --quick)
else
    TRAIN=(--device cuda --warmup 5 --steps 40)
    PREDICT=(--device cuda --repeat 20 --repeat-large 10)
    EXPORT=(--device cuda --repeat 20)
fi
bench bench_train 180 benchmarks/bench_train.py "${TRAIN[@]}"
bench bench_predict 150 benchmarks/bench_predict.py "${PREDICT[@]}"
bench bench_export 120 benchmarks/bench_export.py "${EXPORT[@]}"

echo
echo "gpu_check: done in $(($(date +%s) - T_START)) s; logs in $LOG_DIR"
exit $STATUS
