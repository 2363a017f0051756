#!/usr/bin/env bash
# Everything a GPU session has to check, in one command that ends within 7 minutes (SESSION_S=420) on an H100/H200
# where only python, torch (CUDA) and triton may be installed and nothing may be downloadable:
#
#   preflight  python, torch with CUDA, triton (required); pytest, pytest-timeout, ninja, nvcc, transformers
#              (optional: installed from .whl/ or the package registry when missing, best effort, bounded);
#   build      the C++/CUDA ops, built ONCE in the background from the start (bounded wait). A failure is recorded
#              once in $OUT/native_build_failed.txt and every later process honours it (no rebuild): see
#              benchmarks/gpu_session_helper.py;
#   tests      `pytest -m gpu tests/`, split by the helper: first every test that needs no C++/CUDA ops (Triton,
#              trainer, the contract's triton rows; while the build runs), then, after the build, the rest (the
#              C++/CUDA ops, fused linear, the contract's cuda rows);
#   bench      Triton (and the CUDA C++ ops) against eager: grpo_loss + token_logprobs, 8,192 x 151,936 bf16;
#   peers      torch.compile and Liger at the same shape: opt-in, GPU_SESSION_PEERS=1 (Liger from .whl/);
#   sweep      the Triton launch sweep at V=151,936, without the points that cannot be fast (more than 32 logits
#              per thread, e.g. block 16384 x 8 warps: 228 registers).
#
# Usage, from anywhere (it runs from the checkout, nothing is installed into it):
#   bash benchmarks/gpu_session.sh [all | build tests bench peers sweep ...]     (default: all, in that order)
#   bash benchmarks/gpu_session.sh --budget      print the stage limits and their total, check it, exit
#   bash benchmarks/gpu_session.sh --sweep-plan  print the sweep's launch points (no GPU needed), exit
# Every stage has its own limit (seconds; env overrides): PREFLIGHT_S, BUILD_S (its wait runs alongside the first
# tests, TESTS_GPU_S), TESTS_NATIVE_S, BENCH_S, PEERS_S, SWEEP_S; PREFLIGHT_S + max(BUILD_S, TESTS_GPU_S) +
# TESTS_NATIVE_S + BENCH_S + PEERS_S + SWEEP_S must be <= SESSION_S (420), and every stage is also cut to what is
# left of SESSION_S. A stage past its limit gets SIGINT (pytest and the benchmarks then write what they have),
# then SIGKILL. Per-test timeouts (PER_TEST_S) need pytest-timeout; without it the stage limit still holds.
#
# Results, in $OUT (the device tool's folder, else ./gpu_out), at most 8 files, written as they come:
#   session.log                 every stage: start, limit, rc, time; tool versions; the markdown tables
#   tests.log                   pytest -v -rA of both test stages (one line per test as it finishes)
#   junit.xml                   both test stages (the first stage's alone until the second ends)
#   native_build_failed.txt     only if the build failed: "<cpu|cuda>: <reason>" (the marker)
#   bench/results.json  peers/results.json  sweep.json     rewritten after every case / configuration
# Afterwards, on the dev machine: copy bench/ to benchmarks/results/<gpu>/ and run
#   grpo-kernels bench --replot benchmarks/results/<gpu>        (markdown and PNG plots from the JSON)
# Without .git in the copied tree, pass the commit: GRPO_KERNELS_GIT_COMMIT=<hash> bash benchmarks/gpu_session.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

SESSION_S="${SESSION_S:-420}"
PREFLIGHT_S="${PREFLIGHT_S:-30}"
BUILD_S="${BUILD_S:-140}"
TESTS_GPU_S="${TESTS_GPU_S:-120}"
TESTS_NATIVE_S="${TESTS_NATIVE_S:-55}"
BENCH_S="${BENCH_S:-75}"
PEERS_S="${PEERS_S:-40}"
SWEEP_S="${SWEEP_S:-60}"
PER_TEST_S="${PER_TEST_S:-60}"
INSTALL_S="${INSTALL_S:-10}"   # inside PREFLIGHT_S: each of the two install attempts (.whl/, registry)

budget_total() {
  local b=$BUILD_S; [ "$TESTS_GPU_S" -gt "$b" ] && b=$TESTS_GPU_S
  echo $((PREFLIGHT_S + b + TESTS_NATIVE_S + BENCH_S + PEERS_S + SWEEP_S))
}
print_budget() {
  echo "PREFLIGHT_S=$PREFLIGHT_S BUILD_S=$BUILD_S TESTS_GPU_S=$TESTS_GPU_S TESTS_NATIVE_S=$TESTS_NATIVE_S" \
       "BENCH_S=$BENCH_S PEERS_S=$PEERS_S SWEEP_S=$SWEEP_S TOTAL=$(budget_total) SESSION_S=$SESSION_S"
}
PY="${PYTHON:-python3}"
HELPER="$ROOT/benchmarks/gpu_session_helper.py"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# the sweep: V=151936, 8192 rows; the helper leaves out the points over 32 logits per thread (16384 x 8 warps, ...)
SWEEP_ARGS=(--device cuda --no-progress --vocab 151936 --tokens 8192 --kernels fwd_grad,fwd
            --block-v auto,8192,16384 --num-warps auto,8,16 --programs auto,0.5,1,2)
case "${1:-}" in
  --budget) print_budget; [ "$(budget_total)" -le "$SESSION_S" ]; exit $? ;;
  --sweep-plan) exec "$PY" "$HELPER" sweep-plan "${SWEEP_ARGS[@]}" ;;
esac
if [ "$(budget_total)" -gt "$SESSION_S" ]; then
  echo "gpu_session: the stage limits add up to $(budget_total) s > SESSION_S=$SESSION_S s; lower some" >&2
  print_budget >&2
  exit 2
fi

OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
WORK="${GPU_SESSION_WORK:-$(mktemp -d /tmp/gpu_session.XXXXXX)}"
mkdir -p "$WORK"
LOG="$OUT/session.log"
MARKER="$OUT/native_build_failed.txt"
export GRPO_KERNELS_BUILD_FAILED_FILE="$MARKER"   # read by the helper (and by native.py once it honours it)
export GRPO_KERNELS_JIT_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-12}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/grpo_kernels_ext}"
export GRPO_KERNELS_GIT_COMMIT="${GRPO_KERNELS_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(date -u +%H:%M:%S) +$(now)s] $*" | tee -a "$LOG"; }
left() { echo $(( SESSION_S - $(now) )); }
# the time a stage may take: its own limit, cut to what is left of the session minus 15 s (the 10 s between SIGINT
# and SIGKILL, 5 s to wrap up), so the session ends within SESSION_S whatever a stage does
limit() { local l; l=$(( $(left) - 15 )); [ "$1" -lt "$l" ] && l=$1; echo "$l"; }
SUMMARY=()
status() { SUMMARY+=("$1=$2"); log "$1: rc=$2"; }
# bounded LIMIT CMD...: SIGINT at LIMIT seconds (pytest and the benchmarks write what they have), SIGKILL 10 s on
bounded() {
  local lim=$1; shift
  if [ "$lim" -lt 5 ]; then log "  skipped: the session's time is used up"; return 124; fi
  timeout --signal=INT --kill-after=10 "$lim" "$@"
}

stages=()
for a in "$@"; do stages+=("$a"); done
[ ${#stages[@]} -eq 0 ] && stages=(all)
want() { for s in "${stages[@]}"; do { [ "$s" = all ] || [ "$s" = "$1" ]; } && return 0; done; return 1; }

build_pid=""
cleanup() {
  if [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null; then kill -TERM -- "-$build_pid" 2>/dev/null \
    || kill -TERM "$build_pid" 2>/dev/null; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------ preflight
preflight() {
  log "gpu_session: stages ${stages[*]}; commit $GRPO_KERNELS_GIT_COMMIT; $(print_budget)"
  if ! command -v "$PY" >/dev/null 2>&1; then log "FATAL: no python ($PY); set PYTHON"; exit 2; fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
  if ! timeout 60 "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name()); \
sys.exit(0 if torch.cuda.is_available() else 3)" 2>&1 | tee -a "$LOG"; then
    if [ "${GPU_SESSION_CPU_OK:-0}" != 1 ]; then log "FATAL: torch with CUDA and a visible GPU is required"; exit 2; fi
    log "no CUDA device (GPU_SESSION_CPU_OK=1: going on, for the CPU checks of this script)"
  fi
  if ! "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$LOG"; then
    log "WARNING: no triton: the Triton tests, bench rows and sweep will report it unavailable"
  fi
  local missing=()
  "$PY" -c "import pytest" 2>/dev/null || missing+=(pytest)
  "$PY" -c "import pytest_timeout" 2>/dev/null || missing+=(pytest-timeout)
  { command -v ninja >/dev/null 2>&1 || "$PY" -c "import ninja" 2>/dev/null; } || missing+=(ninja)
  if [ ${#missing[@]} -gt 0 ] && [ "${GPU_SESSION_NO_INSTALL:-0}" = 1 ]; then
    log "missing ${missing[*]}; not installing (GPU_SESSION_NO_INSTALL=1)"
  elif [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (best effort, at most ${INSTALL_S} s): from .whl/ if carried, else the registry"
    local site="$WORK/site"
    mkdir -p "$site"
    if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels first: the device may have no network
      timeout "$INSTALL_S" "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links .whl \
        --target "$site" "${missing[@]}" >>"$WORK/install.log" 2>&1 || true
    fi
    export PYTHONPATH="$PYTHONPATH:$site" PATH="$site/bin:$PATH"
    local still=()
    for m in "${missing[@]}"; do "$PY" -c "import ${m//-/_}" 2>/dev/null || still+=("$m"); done
    if [ ${#still[@]} -gt 0 ] && [ "$(now)" -lt $(( PREFLIGHT_S - INSTALL_S )) ]; then
      timeout "$INSTALL_S" "$PY" -m pip install -q --disable-pip-version-check --timeout 3 --retries 0 \
        --target "$site" "${still[@]}" >>"$WORK/install.log" 2>&1 || log "  could not install ${still[*]} (no network?)"
    fi
  fi
  HAVE_PYTEST=0; "$PY" -c "import pytest" 2>/dev/null && HAVE_PYTEST=1
  TIMEOUT_ARGS=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT_ARGS=(--timeout "$PER_TEST_S")
  else log "no pytest-timeout: no per-test timeouts (each test stage keeps its own limit)"; fi
  [ "$HAVE_PYTEST" = 1 ] || log "WARNING: no pytest: the test stages are skipped"
  if ! command -v nvcc >/dev/null 2>&1 && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    log "no nvcc: the CUDA ops cannot be built"
  fi
  if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/liger" .whl/liger_kernel-*.whl \
      >>"$WORK/install.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$WORK/liger" && log "Liger-Kernel from .whl/"
  fi
  log "preflight done"
}

# ------------------------------------------------------------------------------------------------ build
# start_build: the one build, in the background (its own process group), unless a failure is recorded already.
start_build() {
  if [ -s "$MARKER" ]; then
    log "build: not retried, a failure is recorded in $MARKER: $(tr '\n' ' ' <"$MARKER")"
    return
  fi
  BUILD_T0=$(date +%s)
  log "build: C++ CPU + CUDA ops in the background (limit ${BUILD_S} s; MAX_JOBS=$MAX_JOBS, arch $TORCH_CUDA_ARCH_LIST)"
  if command -v setsid >/dev/null 2>&1; then
    setsid "$PY" "$HELPER" build >"$WORK/build.log" 2>&1 &
  else
    "$PY" "$HELPER" build >"$WORK/build.log" 2>&1 &
  fi
  build_pid=$!
}
# wait_build: wait for it until BUILD_S after its start; past that, stop it and record the failure (once).
wait_build() {
  [ -n "$build_pid" ] || return 0
  local until=$(( BUILD_T0 + BUILD_S )) rc=0
  while kill -0 "$build_pid" 2>/dev/null && [ "$(date +%s)" -lt "$until" ] && [ "$(left)" -gt 5 ]; do sleep 1; done
  if kill -0 "$build_pid" 2>/dev/null; then
    kill -TERM -- "-$build_pid" 2>/dev/null || kill -TERM "$build_pid" 2>/dev/null
    sleep 2; kill -KILL -- "-$build_pid" 2>/dev/null || kill -KILL "$build_pid" 2>/dev/null
    wait "$build_pid" 2>/dev/null
    # a stopped build leaves torch's build lock behind: remove it, or the next user of the directory waits forever
    find "$TORCH_EXTENSIONS_DIR" -maxdepth 3 -name lock -type f -delete 2>/dev/null
    rc=124
  else
    wait "$build_pid"; rc=$?
  fi
  build_pid=""
  # whatever did not get ready is recorded once (the helper records its own failures; this covers a stopped or
  # crashed build process)
  for k in cpu cuda; do
    grep -q "^build: $k ops ready" "$WORK/build.log" || grep -q "^$k:" "$MARKER" 2>/dev/null || {
      if [ "$rc" = 124 ]; then echo "$k: the build did not finish within BUILD_S=${BUILD_S} s (stopped)"
      else echo "$k: the build process ended with rc=$rc before the $k ops were ready"; fi; } >>"$MARKER"
  done
  grep -E "^build: " "$WORK/build.log" | tee -a "$LOG" >/dev/null
  status build "$rc"
  log "build: $(( $(date +%s) - BUILD_T0 )) s"
  if [ -s "$MARKER" ]; then
    log "build FAILED, recorded once in $MARKER (later stages report it, none rebuilds):"
    sed 's/^/    /' "$MARKER" | tee -a "$LOG" >/dev/null
    tail -n 40 "$WORK/build.log" | sed 's/^/    | /' >>"$LOG"
  fi
}

# ------------------------------------------------------------------------------------------------ tests
# run_pytest TAG NAME LIMIT JUNIT PHASE ARGS...: `pytest -m gpu` of the tests that do not / do need the C++/CUDA ops
# (the helper splits every collected test into exactly one of the two phases; see its needs_native)
run_pytest() {
  local tag=$1 name=$2 lim=$3 junit=$4 phase=$5 policy=marker; shift 5
  [ "$phase" = without-native ] && policy=withheld
  log "$tag ($name): limit ${lim} s"
  echo "===== $name: pytest -m gpu $* ($phase) =====" >>"$OUT/tests.log"
  GPU_SESSION_NATIVE="$policy" GPU_SESSION_PHASE="$phase" bounded "$lim" "$PY" "$HELPER" run -m pytest -m gpu -v -rA \
    -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$junit" ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} "$@" \
    >>"$OUT/tests.log" 2>&1
  local rc=$?
  status "$tag" "$rc"
  log "  $(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$OUT/tests.log" | tail -n 1)"
  return 0
}
TEST_ARGS=(tests)
tests_without_native() {
  [ "$HAVE_PYTEST" = 1 ] || return 0
  "$PY" -c "import transformers" 2>/dev/null || { TEST_ARGS+=(--ignore tests/test_trainer.py)
    log "no transformers: the trainer's GPU tests are left out"; }
  run_pytest tests-gpu "Triton kernels and launch, trainer, contract rows of triton" "$(limit "$TESTS_GPU_S")" \
    "$OUT/junit.xml" without-native "${TEST_ARGS[@]}"
}
tests_with_native() {
  [ "$HAVE_PYTEST" = 1 ] || return 0
  run_pytest tests-native "C++/CUDA ops, fused linear, contract rows of cuda" "$(limit "$TESTS_NATIVE_S")" \
    "$WORK/junit_native.xml" with-native "${TEST_ARGS[@]}"
  "$PY" "$HELPER" merge-junit "$OUT/junit.xml" "$OUT/junit.xml" "$WORK/junit_native.xml" 2>>"$LOG"
}

# ------------------------------------------------------------------------------------------------ benchmarks
bench_stage() {  # NAME LIMIT DIR IMPLS
  local name=$1 lim=$2 dir=$3 impls=$4
  log "$name: grpo_loss + token_logprobs, 8192 tokens x V=151936 bf16 ($impls); limit ${lim} s"
  bounded "$lim" "$PY" "$HELPER" run -m grpo_kernels.cli bench --device cuda --no-plots --no-progress \
    --shapes 16x512x151936 --dtypes bf16 --ops grpo_loss,token_logprobs --loss-types softmax,grpo \
    --modes fwd_bwd,fwd --impls "$impls" --output-dir "$dir" >"$WORK/$name.md" 2>>"$LOG"
  status "$name" $?
  if [ -f "$dir/results.md" ]; then mv "$dir/results.md" "$WORK/$name.results.md"; fi  # JSON only in $OUT
  cat "$WORK/$name.md" >>"$LOG"
}
sweep_stage() {
  log "sweep: Triton launch parameters at V=151936 (the points over 32 logits per thread left out); limit ${1} s"
  "$PY" "$HELPER" sweep-plan "${SWEEP_ARGS[@]}" >"$WORK/sweep_plan.txt" 2>>"$LOG" \
    && log "sweep: $(wc -l <"$WORK/sweep_plan.txt") points"
  bounded "$1" "$PY" "$HELPER" sweep "${SWEEP_ARGS[@]}" --output "$OUT/sweep.json" >"$WORK/sweep_stdout.md" 2>>"$LOG"
  status sweep $?
  if [ -f "$OUT/sweep.md" ]; then cat "$OUT/sweep.md" >>"$LOG"; mv "$OUT/sweep.md" "$WORK/"; fi
}

# ------------------------------------------------------------------------------------------------ the session
preflight
if want build || want tests || want bench || want peers || want sweep; then start_build; fi
if want tests; then tests_without_native; fi
wait_build
if want tests; then tests_with_native; fi
if want bench; then bench_stage bench "$(limit "$BENCH_S")" "$OUT/bench" torch,triton,cuda; fi
if want peers; then
  if [ "${GPU_SESSION_PEERS:-0}" = 1 ]; then
    bench_stage peers "$(limit "$PEERS_S")" "$OUT/peers" torch,torch.compile,liger
  else
    log "peers: skipped (opt-in: GPU_SESSION_PEERS=1; Liger from .whl/)"
  fi
fi
if want sweep; then sweep_stage "$(limit "$SWEEP_S")"; fi
log "gpu_session: done in $(now) s; ${SUMMARY[*]+${SUMMARY[*]}}; files in $OUT: $(cd "$OUT" && find . -type f | sort \
  | tr '\n' ' ')"
