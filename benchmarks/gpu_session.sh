#!/usr/bin/env bash
# Everything a GPU session has to check, in one command sized for one device call (about 9 minutes):
#
#   1. the `gpu`-marked tests: Triton kernels, fused linear, trainer; then the CUDA C++ ops, whose JIT build
#      (sm_90, MAX_JOBS=16) runs in the background from the start;
#   2. the benchmark at the issues' target shapes (8,192 tokens x V=151,936 bf16: grpo_loss and
#      token_logprobs against eager, torch.compile and Liger when carried; fused linear at H=4,096);
#   3. the Triton launch-parameter sweep at V=151,936 (`grpo-kernels sweep`).
#
# Usage, from the repository root (no install needed: it runs from the checkout):
#   bash benchmarks/gpu_session.sh [all|tests|bench|fused|sweep ...]   (default: all, in that order)
# Results go to $OUT (the device tool's output folder), else ./gpu_out; 8 files, the most the device tool
# returns: session.log, tests.log, bench/results.{json,md}, fused/results.{json,md}, sweep.{json,md}.
# Each stage has its own time limit in seconds (TESTS_S, CPP_TESTS_S, BENCH_S, FUSED_S, SWEEP_S; 550 in all)
# so that the command ends inside one call and keeps what it measured (results.json files are rewritten
# after every case, the sweep's JSON after every configuration).
# Liger-Kernel is benchmarked when its wheel sits in .whl/ (carry it: see benchmarks/README.md).
# Afterwards, on the dev machine: copy bench/ to benchmarks/results/<gpu>/ and run
#   grpo-kernels bench --replot benchmarks/results/<gpu>        (PNG plots are not made on the device)
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TESTS_S="${TESTS_S:-130}"
CPP_TESTS_S="${CPP_TESTS_S:-80}"
BENCH_S="${BENCH_S:-170}"
FUSED_S="${FUSED_S:-80}"
SWEEP_S="${SWEEP_S:-90}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" GRPO_KERNELS_JIT_CUDA=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/grpo_kernels_ext}"

LOG="$OUT/session.log"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
want() { for s in "${stages[@]}"; do [ "$s" = all ] || [ "$s" = "$1" ] && return 0; done; return 1; }

# Without .git in the copied tree, pass the commit in: GRPO_KERNELS_GIT_COMMIT=<hash> bash benchmarks/gpu_session.sh
export GRPO_KERNELS_GIT_COMMIT="${GRPO_KERNELS_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
log "gpu_session: stages ${stages[*]}; commit ${GRPO_KERNELS_GIT_COMMIT}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee -a "$LOG"

if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/grpo_site .whl/liger_kernel-*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/grpo_site" && log "Liger-Kernel from .whl/"
fi

build_pid=""
if want tests || want bench || want fused || want sweep; then
  # CPU + CUDA C++ ops, built once into TORCH_EXTENSIONS_DIR (a file lock makes other users wait for it)
  ( "$PY" -c "from grpo_kernels.kernels import native; native.ensure_loaded('cuda'); print('C++/CUDA ops built')" \
      >>"$LOG" 2>&1; log "extension build finished (rc=$?)" ) &
  build_pid=$!
fi

if want tests; then
  log "tests: Triton, fused linear, trainer (gpu marker)"
  timeout "$TESTS_S" "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider tests/test_triton_kernels.py \
    tests/test_fused_linear.py tests/test_trainer.py 2>&1 | tee "$OUT/tests.log" | tail -n 25 >>"$LOG"
  log "tests rc=$?"
  [ -n "$build_pid" ] && wait "$build_pid"
  log "tests: CUDA C++ ops (gpu marker)"
  timeout "$CPP_TESTS_S" "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider tests/test_cpp_kernels.py 2>&1 \
    | tee -a "$OUT/tests.log" | tail -n 25 >>"$LOG"
  log "cpp tests rc=$?"
fi
[ -n "$build_pid" ] && wait "$build_pid" 2>/dev/null

if want bench; then
  log "bench: grpo_loss and token_logprobs, 8192 tokens x V=151936 bf16"
  timeout "$BENCH_S" "$PY" -m grpo_kernels.cli bench --device cuda --no-plots --no-progress \
    --shapes 16x512x151936 --dtypes bf16 --loss-types softmax,grpo --modes fwd_bwd,fwd --output-dir "$OUT/bench" >>"$LOG" 2>&1
  log "bench rc=$?"
fi

if want fused; then
  log "bench: fused linear, 8192 tokens x H=4096 x V=151936 bf16"
  timeout "$FUSED_S" "$PY" -m grpo_kernels.cli bench --device cuda --no-plots --no-progress \
    --shapes 16x512x4096x151936 --dtypes bf16 --loss-types grpo,softmax --modes fwd_bwd \
    --output-dir "$OUT/fused" >>"$LOG" 2>&1
  log "fused bench rc=$?"
fi

if want sweep; then
  log "sweep: Triton launch parameters at V=151936"
  timeout "$SWEEP_S" "$PY" -m grpo_kernels.cli sweep --device cuda --no-progress --vocab 151936 --tokens 8192 \
    --kernels fwd_grad,fwd --block-v auto,8192,16384 --num-warps auto,8,16 --programs auto,0.5,1,2 \
    --output "$OUT/sweep.json" \
    >/dev/null 2>>"$LOG"
  log "sweep rc=$?"
fi
log "gpu_session: done"
