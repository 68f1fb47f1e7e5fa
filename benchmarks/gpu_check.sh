#!/usr/bin/env bash
# Every check that needs a CUDA device, as one run that fits a short loan of a GPU machine.
# The whole run keeps to GPU_CHECK_SECONDS (default 540): each step gets its own limit, cut
# to what is left of the whole, and a step with under 10 s left is skipped. Steps, most
# important first:
#   1. the environment: nvidia-smi, torch and CUDA versions, the commit;
#   2. the CUDA extensions' first build and their self-checks on the device (a step of its
#      own, so that a slow build cannot eat the tests' time). With ORIGINAL_SRC / EG3D_SRC
#      set, the original's CUDA plugins build at the same time, in the background
#      (vs_original.py --prepare);
#   3. the GPU tests (pytest -m gpu; over several processes where pytest-xdist is
#      installed): the CUDA ops against their references (forward and gradient), their
#      first-use self-checks, and the renderer, rasterizer, FLAME and networks on CUDA
#      against the CPU;
#   4. with ORIGINAL_SRC (a checkout of MrTornado24/Next3D) and/or EG3D_SRC (of NVlabs/eg3d):
#      benchmarks/vs_original.py --device cuda, this project against the original side by side;
#   5. benchmarks/train_step.py on CUDA: EG3D at FFHQ sizes (ffhq512-eg3d; Next3D at FFHQ
#      sizes needs the user's FLAME template) and small128 Next3D (bundled head mesh), with
#      the profiles of its Gmain (batch 8) and of its R1 phase at batch 32 (once 2.3x slower
#      than the original's on an H200, a slow cuDNN kernel; 0.87x since our own double
#      backward of the convolutions), and small128 at batch 8 with the meshes' geometry
#      given (--geometry-in-loader: what the loader's workers make; ~15% fewer ops per step,
#      not yet timed on a GPU), and train.py end to end with and without that option
#      (benchmarks/loader_geometry.py: whether 3 workers keep up);
#   6. benchmarks/rasterize.py on CUDA: 4 heads x 4 views at 256;
#   7. benchmarks/ops.py on CUDA: kernels vs references (without its torch.compile column,
#      whose compiles would not fit);
#   8. with GPU_CHECK_COMPILE=1 and ORIGINAL_SRC: vs_original.py --compile all on CUDA (our
#      networks through torch.compile; the small128 step is bound by the host on an H200,
#      which is what compiled graphs cut), if the run's time allows. Its warm-up (Triton
#      compiles of D and of G.synthesis, each new input signature checked against eager)
#      did not end within 285 s on an H200, so a short loan wants GPU_CHECK_COMPILE=only:
#      steps 1, 2 and 8 alone, step 8 with the rest of the run's time. Step 8 fails when a
#      network fell back to eager (vs_original.py exits 1 then);
#   9. with GPU_CHECK_COMPILE=cudagraphs and ORIGINAL_SRC: steps 1 and 2, the test of the
#      cudagraphs backend on the device (pytest -k cudagraphs), then vs_original.py --compile all
#      --compile-backend cudagraphs: D, G's synthesis and its density query traced by dynamo and
#      replayed as CUDA graphs with eager kernels (no Triton: the warm-up is the tracing, ~130 s in all on this
#      project's 2-core CPU machine: 29-37 s per synthesis signature, 3 of them, 23 s for the
#      density query, ~2 s per D signature;
#      the compile lines say whether cudagraph trees captured the graphs), first with
#      --geometry-in-loader (no rasterization in the training phases: G's synthesis traces as
#      one graph forward and one backward), then without it (the rasterization splits the
#      synthesis) if time is left.
# A failing step does not stop the others. Results go to $OUT if it is set (a remote
# runner's collection folder), else to benchmarks/results/gpu-check-<UTC date>-<HHMM>/:
# log.txt, environment.txt and the benchmarks' tables. Exit status: 0 if every step passed,
# 1 if one failed or was skipped, 2 without a GPU.
#
#     [ORIGINAL_SRC=DIR] [EG3D_SRC=DIR] [PYTHON=...] [GPU_CHECK_SECONDS=540] [GPU_CHECK_COMPILE=1|only|cudagraphs] bash benchmarks/gpu_check.sh
#
# NEXT3D_COMMIT names the commit in the results when the tree was copied to the GPU machine
# (its git metadata there may be missing or stale).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "Error: $PY: torch sees no CUDA device (or does not import); this script is for a GPU machine" >&2
    exit 2
fi
case "${GPU_CHECK_COMPILE:-}" in
    ''|1) ;;
    only|cudagraphs) [ -n "${ORIGINAL_SRC:-}" ] || { echo "Error: GPU_CHECK_COMPILE=${GPU_CHECK_COMPILE}: the compiled comparison needs ORIGINAL_SRC (a checkout of MrTornado24/Next3D)" >&2; exit 2; } ;;
    *) echo "Error: GPU_CHECK_COMPILE=${GPU_CHECK_COMPILE}: expected 1, only or cudagraphs (or nothing)" >&2; exit 2 ;;
esac
budget=${GPU_CHECK_SECONDS:-540}
dest=${OUT:-benchmarks/results/gpu-check-$(date -u +%Y-%m-%d-%H%M)}
mkdir -p "$dest"
{
    nvidia-smi
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name())'
    echo "commit ${NEXT3D_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
} > "$dest/environment.txt" 2>&1

failed=0
step() {                        # step NAME SECONDS COMMAND...: run with a time limit, log, report
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    local left=$((budget - SECONDS - 5))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, the run's $budget s are spent" | tee -a "$dest/log.txt"
        failed=1
        return
    fi
    echo "== $name (limit ${limit} s): $*" | tee -a "$dest/log.txt"
    timeout -k 10 "$limit" "$@" >> "$dest/log.txt" 2>&1
    status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$dest/log.txt"
    [ "$status" -eq 0 ] || failed=1
}

# The original's CUDA plugins, built (benchmarks/vs_original.py --prepare) while ours build, so
# that vs_original finds them built.
sources=()
[ -n "${ORIGINAL_SRC:-}" ] && sources+=(--original-src "$ORIGINAL_SRC")
[ -n "${EG3D_SRC:-}" ] && sources+=(--eg3d-src "$EG3D_SRC")
original_build=""
if [ ${#sources[@]} -gt 0 ]; then
    timeout -k 10 $((budget < 480 ? budget / 2 : 240)) "$PY" benchmarks/vs_original.py --device cuda --prepare "${sources[@]}" > "$dest/original-build.txt" 2>&1 &
    original_build=$!
fi

step build 150 "$PY" -c 'import sys, torch
from torch_utils.ops import _build, bias_act, upfirdn2d
ok = [_build.kernel_available(n, m.SOURCES, torch.device("cuda")) for n, m in (("bias_act", bias_act), ("upfirdn2d", upfirdn2d))]
print("kernels built and self-checked (bias_act, upfirdn2d):", ok)
sys.exit(0 if all(ok) else 1)'
compile_only=$(case "${GPU_CHECK_COMPILE:-}" in only|cudagraphs) echo 1 ;; esac)
if [ -z "$compile_only" ]; then
    workers=()
    "$PY" -c 'import xdist' 2>/dev/null && workers=(-n 6)
    step pytest-gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors --durations=10 "${workers[@]}" tests
fi
if [ -n "$original_build" ]; then
    wait "$original_build"
    { echo "== the original's plugin build (background, exit $?):"; cat "$dest/original-build.txt"; } >> "$dest/log.txt"
    rm -f "$dest/original-build.txt"
fi
if [ -z "$compile_only" ]; then
    [ ${#sources[@]} -gt 0 ] && step vs-original 150 "$PY" benchmarks/vs_original.py --device cuda "${sources[@]}" --pairs 5 --batch 8 --outdir "$dest"
    step train-ffhq512-eg3d 70 "$PY" benchmarks/train_step.py --cfg ffhq512-eg3d --batch 4 --device cuda --outdir "$dest"
    step train-small128 45 "$PY" benchmarks/train_step.py --cfg small128 --batch 8 --device cuda --profile Gmain --outdir "$dest"
    step profile-dreg-small128 45 "$PY" benchmarks/train_step.py --cfg small128 --batch 32 --device cuda --repeats 1 --profile Dreg --outdir "$dest"
    step train-small128-geometry 45 "$PY" benchmarks/train_step.py --cfg small128 --batch 8 --device cuda --geometry-in-loader --outdir "$dest"
    step loader-geometry-small128 100 "$PY" benchmarks/loader_geometry.py --cfg small128 --batch 8 --workers 3 --repeats 1 --outdir "$dest"
    step rasterize 30 "$PY" benchmarks/rasterize.py --device cuda --batch 4 --resolution 256
    step ops 60 "$PY" benchmarks/ops.py --device cuda --no-compile --outdir "$dest"
fi
if [ "${GPU_CHECK_COMPILE:-}" = cudagraphs ]; then
    step pytest-cudagraphs 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider -k cudagraphs tests/test_compiled.py
    step vs-original-cudagraphs-geometry 300 "$PY" benchmarks/vs_original.py --device cuda --original-src "$ORIGINAL_SRC" --compile all --compile-backend cudagraphs --geometry-in-loader --pairs 3 --batch 8 --outdir "$dest"
    step vs-original-cudagraphs $budget "$PY" benchmarks/vs_original.py --device cuda --original-src "$ORIGINAL_SRC" --compile all --compile-backend cudagraphs --pairs 3 --batch 8 --outdir "$dest"
elif [ -n "${GPU_CHECK_COMPILE:-}" ] && [ -n "${ORIGINAL_SRC:-}" ]; then     # opt-in: Triton compiles take minutes
    step vs-original-compiled $budget "$PY" benchmarks/vs_original.py --device cuda --original-src "$ORIGINAL_SRC" --compile all --pairs 3 --batch 8 --outdir "$dest"
fi
echo "results in $dest"
exit "$failed"
