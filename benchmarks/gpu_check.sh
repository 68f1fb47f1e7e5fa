#!/usr/bin/env bash
# Every check that needs a CUDA device, as one run that fits a short loan of a GPU machine
# (at most 9 minutes by the steps' limits, 520 s plus up to 15 s per step to stop a hung one):
#   1. the environment: nvidia-smi, torch and CUDA versions, the commit;
#   2. the CUDA extensions' first build and their self-checks on the device (a step of its
#      own, so that a slow build cannot eat the tests' time);
#   3. the GPU tests (pytest -m gpu): the CUDA ops against their references (forward and
#      gradient), their first-use self-checks, and the renderer, rasterizer, FLAME and
#      networks on CUDA against the CPU;
#   4. benchmarks/ops.py on CUDA: kernels vs references (without its torch.compile column,
#      whose compiles would not fit);
#   5. benchmarks/train_step.py on CUDA: small128 Next3D (bundled head mesh) and EG3D at
#      FFHQ sizes (ffhq512-eg3d; Next3D at FFHQ sizes needs the user's FLAME template).
# Each step has its own time limit; a failing step does not stop the others. Results go to
# $OUT if it is set (a remote runner's collection folder), else to
# benchmarks/results/gpu-check-<UTC date>-<HHMM>/: log.txt, environment.txt and the
# benchmarks' tables. Exit status: 0 if every step passed, 1 if one failed, 2 without a GPU.
#
#     bash benchmarks/gpu_check.sh              (PYTHON=... to choose the interpreter)
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "Error: $PY: torch sees no CUDA device (or does not import); this script is for a GPU machine" >&2
    exit 2
fi
dest=${OUT:-benchmarks/results/gpu-check-$(date -u +%Y-%m-%d-%H%M)}
mkdir -p "$dest"
{
    nvidia-smi
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name())'
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} > "$dest/environment.txt" 2>&1

failed=0
step() {                        # step NAME SECONDS COMMAND...: run with a time limit, log, report
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$dest/log.txt"
    timeout -k 15 "$limit" "$@" >> "$dest/log.txt" 2>&1
    status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$dest/log.txt"
    [ "$status" -eq 0 ] || failed=1
}
step build 150 "$PY" -c 'import sys, torch
from torch_utils.ops import _build, bias_act, upfirdn2d
ok = [_build.kernel_available(n, m.SOURCES, torch.device("cuda")) for n, m in (("bias_act", bias_act), ("upfirdn2d", upfirdn2d))]
print("kernels built and self-checked (bias_act, upfirdn2d):", ok)
sys.exit(0 if all(ok) else 1)'
step pytest-gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
step ops 80 "$PY" benchmarks/ops.py --device cuda --no-compile --outdir "$dest"
step train-small128 60 "$PY" benchmarks/train_step.py --cfg small128 --batch 8 --device cuda --outdir "$dest"
step train-ffhq512-eg3d 80 "$PY" benchmarks/train_step.py --cfg ffhq512-eg3d --batch 4 --device cuda --outdir "$dest"
echo "results in $dest"
exit "$failed"
