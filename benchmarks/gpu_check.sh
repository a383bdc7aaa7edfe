#!/usr/bin/env bash
# One prepared run for a GPU machine (H100/H200, possibly without internet). From the repository root:
#
#     bash benchmarks/gpu_check.sh [CIFAR_TGZ]          # default data/cifar10-jpeg.tar.gz (or env CIFAR_TGZ)
#     bash benchmarks/gpu_check.sh --smoke              # the Python parts on CPU at toy size (validates this script)
#
# Everything goes to ${OUT:-bench-out}/: gpu_check.log, summary.md (also printed at the end), and one
# JSON + Markdown file per measurement. Each step runs under `timeout`, cut to what is left of a
# total budget (BUDGET_S, default 480 s), so a hang cannot eat the machine's time; SKIP='regex' leaves out
# the steps whose names match; AB_IPCS='50' times only IPC 50 in the A/B. Steps:
#   1. torch (from .whl/*.whl if `import torch` fails) and the package (pip install -e ., or PYTHONPATH)
#   2. CUDA vs CPU: meta_gradient in float64, both memory modes (benchmarks/cuda_check.py)
#   3. `dpd experts` + `dpd distill --device cuda` end to end on the embedded dataset, a few iterations
#   4. CIFAR-10 (JPEG copy), unpacked to /tmp: `dpd experts` (1 expert, 2 epochs, ConvNet-128) images/s;
#      graph_check.py: a captured graph's replay vs the eager meta-gradient, next to eager vs itself;
#      distill_ab.py: dpd full/low/low12 (--keep-graphs 12), eager and with CUDA graphs (--cuda-graphs),
#      vs the reference MTT loop, and low memory's forward sweep alone (where low's extra time goes),
#      rho 0 everywhere, interleaved in one process, 3 warm-up + 10 timed rounds, IPC 10 and 50 at N 30,
#      peak memory per mode (the fair comparison); the graphs' equality with eager is step 6's tests
#   5. host syncs per distillation iteration, CUDA graphs on and off (benchmarks/sync_check.py)
#   6. the GPU-marked tests (pytest -m gpu), if pytest is installed
#   7. speed.py distill: IPC 10 and 50, N = 30, full vs low vs low12 vs reference MTT, each in its own process,
#      s/iteration and torch.cuda.max_memory_allocated, from the real expert of step 4 (full IPC 50 is
#      skipped if its estimate exceeds 80% of GPU memory); speed.py experts + eval (dpd vs bare loop)
#   8. data parallel on one GPU: torchrun 2 ranks (gloo) vs 1 process, s/iteration and peak memory per rank
#      (benchmarks/dp_bench.py); correctness of 2 ranks vs 1 is step 6's test_two_ranks_on_cuda_distil_like_one
#   9. distill_ab.py full/low with and without --deterministic (cuDNN's deterministic algorithms), IPC 10, N 30
#  10. if time is left: distill IPC 10 N = 30 again with torch.backends.cudnn.benchmark = True
# Python packages the machine lacks travel as wheels in .whl/ (unpacked to $WORK/site, first on PYTHONPATH).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
OUT="${OUT:-bench-out}"
CIFAR_TGZ="${1:-${CIFAR_TGZ:-data/cifar10-jpeg.tar.gz}}"
BUDGET_S="${BUDGET_S:-480}"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/dpd-gpu-check}"
START=$SECONDS

mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT/summary.md" "$OUT/steps.tsv"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

# Keep every dpd default location inside the scratch folder.
export DPD_EXPERTS_ROOT="$WORK/experts-root" DPD_CACHE_ROOT="$WORK/cache" DPD_DATA_ROOT="$WORK/data"
export NO_COLOR=1 COLUMNS=120 PYTHONUNBUFFERED=1
export PY WORK OUT CIFAR_TGZ SMOKE

if (( SMOKE )); then
  DEVICE=cpu; WIDTH=16
  SPEED_COMMON=(--device cpu --threads 1 --width 16)
else
  DEVICE=cuda; WIDTH=128
  SPEED_COMMON=(--device cuda)
fi
export DEVICE WIDTH

remaining() { echo $(( BUDGET_S - (SECONDS - START) )); }

# step NAME MAX_SECONDS COMMAND...: run under timeout (capped by the remaining budget), record rc and time.
# COMMAND may be one of the functions below: they are exported and run in a child bash (timeout needs a program).
step() {
  local name=$1 max=$2; shift 2
  local left; left=$(remaining)
  if [[ -n "${SKIP:-}" && "$name" =~ $SKIP ]]; then   # SKIP: a regex of step names not to run (a partial rerun)
    printf '%s\tskipped (SKIP)\t0\n' "$name" >> "$OUT/steps.tsv"
    echo "=== $name: SKIPPED (SKIP)"
    return 125
  fi
  local t=$(( max < left ? max : left ))
  if (( t < 15 )); then
    printf '%s\tskipped: out of time budget\t0\n' "$name" >> "$OUT/steps.tsv"
    echo "=== $name: SKIPPED (budget: ${left}s left)"
    return 124
  fi
  echo "=== $name (timeout ${t}s, $(( SECONDS - START ))s elapsed)"
  local t0=$SECONDS rc
  if declare -F "$1" > /dev/null; then
    timeout -k 10 "$t" bash -o pipefail -c "$1"
  else
    timeout -k 10 "$t" "$@"
  fi
  rc=$?
  local status="ok"
  (( rc == 124 || rc == 137 )) && status="TIMEOUT after ${t}s"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="FAILED (exit $rc)"
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" >> "$OUT/steps.tsv"
  return $rc
}

# ---------------------------------------------------------------- 1. torch and the package
install() {
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    if compgen -G ".whl/*.whl" > /dev/null; then
      "$PY" -m pip install --no-index --find-links .whl .whl/*.whl \
        || "$PY" -m pip install --break-system-packages --no-index --find-links .whl .whl/*.whl || return 1
    else
      echo "torch is not importable and there is no .whl/ folder to install it from"; return 1
    fi
  fi
  local deps=(typer rich pydantic safetensors platformdirs PIL numpy)
  # Wheels carried in .whl/ (no registry on the GPU machine): unpacked into $WORK/site, which is on
  # PYTHONPATH for every step, so they win over older copies in the machine's own environment.
  local wheels=(); local w
  for w in .whl/*.whl; do [[ -f "$w" && "$(basename "$w")" != torch-* ]] && wheels+=("$w"); done
  if (( ${#wheels[@]} )); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "${wheels[@]}" \
      && echo "unpacked ${#wheels[@]} wheels into $WORK/site" || echo "could not unpack .whl/ into $WORK/site"
  fi
  local pipargs=(--no-build-isolation -e .)
  if PYTHONPATH="$WORK/site" "$PY" -c "import $(IFS=,; echo "${deps[*]}")" 2>/dev/null; then
    pipargs=(--no-deps "${pipargs[@]}")
  else
    pipargs=(--no-index --find-links .whl "${pipargs[@]}")
  fi
  "$PY" -m pip install -q "${pipargs[@]}" || "$PY" -m pip install -q --break-system-packages "${pipargs[@]}" \
    || { echo "pip install failed: using PYTHONPATH=$PWD"; }
  PYTHONPATH="$PWD:$WORK/site" "$PY" -c 'import dpd_cli, torch, pydantic, typer; print("dpd", dpd_cli.__version__, "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
}
export -f install
if (( SMOKE )); then
  echo "=== smoke: using the installed package, no pip"
else
  step "install torch + dpd" 150 install
fi
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"   # the package is pure Python: works even if pip could not install it

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
[[ -z "$GPU_NAME" ]] && GPU_NAME="none (smoke: CPU)"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "GPU: $GPU_NAME"

# ---------------------------------------------------------------- 2. CUDA vs CPU, float64
step "cuda vs cpu (float64 meta_gradient)" 120 "$PY" benchmarks/cuda_check.py --device "$DEVICE" --out "$OUT/cuda_check.json"

# ---------------------------------------------------------------- 3. the CLI on the device
cli_e2e() {
  local d="$WORK/cli"
  rm -rf "$d"
  "$PY" -m dpd_cli experts --dataset fashion-mnist-mini --num 1 --epochs 2 --width 16 --train-per-class 100 \
      --device "$DEVICE" --out "$d/experts" --quiet || return 1
  for mem in full low; do
    "$PY" -m dpd_cli distill --dataset fashion-mnist-mini --width 16 --train-per-class 100 --experts "$d/experts" \
        --ipc 2 --iterations 3 --syn-steps 5 --expert-epochs 1 --max-start-epoch 1 --memory "$mem" \
        --device "$DEVICE" --out "$d/run-$mem" --force --json > "$d/distill-$mem.json" || return 1
    echo "dpd distill --memory $mem --device $DEVICE: $(tr -d '\n' < "$d/distill-$mem.json" | head -c 300)"
  done
}
export -f cli_e2e
step "dpd experts + distill --device $DEVICE (CLI)" 120 cli_e2e

# ---------------------------------------------------------------- 4. timings on CIFAR-10 (JPEG copy)
CIFAR_DIR="$WORK/cifar10-jpeg"
unpack() {
  [[ -f "$CIFAR_TGZ" ]] || { echo "no CIFAR archive at $CIFAR_TGZ (pass its path as the first argument or CIFAR_TGZ)"; return 1; }
  rm -rf "$CIFAR_DIR" && mkdir -p "$CIFAR_DIR"
  if (( SMOKE )); then   # 20 images per class and split: exercises the imagefolder path in seconds
    tar -xzf "$CIFAR_TGZ" -C "$CIFAR_DIR" --wildcards '*/00[01]?.jpg'
  else
    tar -xzf "$CIFAR_TGZ" -C "$CIFAR_DIR"
  fi
  echo "unpacked $(find "$CIFAR_DIR" -name '*.jpg' | wc -l) images to $CIFAR_DIR"
}
export CIFAR_DIR
export -f unpack
EXPERTS_ARG=()
if step "unpack CIFAR-10 JPEG" 60 unpack; then
  DATA_ARGS="--dataset imagefolder --data-dir $CIFAR_DIR"; DATA_NAME="CIFAR-10 (JPEG copy)"
else   # no archive: time the embedded set rather than nothing (28x28 grayscale, 5,000 images)
  DATA_ARGS="--dataset fashion-mnist-mini"; DATA_NAME="fashion-mnist-mini (embedded; no CIFAR archive)"
fi
export DATA_ARGS DATA_NAME E_EPOCHS=2 E_EXTRA=""
(( SMOKE )) && E_EXTRA="--train-per-class 10"
experts_cli() {
  rm -rf "$WORK/experts-bench"
  # shellcheck disable=SC2086  # DATA_ARGS and E_EXTRA are lists of plain words
  "$PY" -m dpd_cli experts $DATA_ARGS --num 1 --epochs "$E_EPOCHS" --width "$WIDTH" \
      $E_EXTRA --device "$DEVICE" --out "$WORK/experts-bench" --quiet --json > "$OUT/experts-cli.json"
}
export -f experts_cli
if step "dpd experts, $DATA_NAME (1 expert, $E_EPOCHS epochs, ConvNet-$WIDTH)" 150 experts_cli; then
  EXPERTS_ARG=(--experts "$WORK/experts-bench")
fi
if (( SMOKE )); then
  X_ARGS=(--expert-images 128 --expert-reps 2 --eval-ipc 2 --eval-epochs 2 --eval-reps 2)
  D_ARGS=(--ipc 1,2 --steps 2 --modes full,low,low2,ref --iters 1)
else
  X_ARGS=(--expert-images 25600 --expert-reps 3 --eval-epochs 50 --eval-reps 3)
  D_ARGS=(--ipc 10,50 --steps 30 --modes full,low,low12,ref --iters 3 --worker-timeout 150)
fi
read -r -a DATA_ARR <<< "$DATA_ARGS"
GRAPH_ARGS=(--ipc 10 --steps 30)
(( SMOKE )) && GRAPH_ARGS=(--ipc 1 --steps 3 --width 16)
# The fair comparison first: dpd full and low vs the reference MTT loop, rho 0 on every side, the same
# start/target parameters and DSA draws, interleaved in one process, 3 warm-up + 10 timed rounds.
distill_ab() {
  # Every image in every student step, as MTT's CIFAR-10 settings (IPC 1, 10 and 50: batch_syn = all).
  # low12: low memory keeping the last 12 of the 30 steps' graphs (--keep-graphs 12); sweep: low memory's
  # forward sweep alone (low - sweep is its backward sweep, to compare with full).
  local ipc extra=(--steps 30 --warmup 3 --iters 10 --batch-syn 0 --modes full,low,ref,full_graph,low_graph,low12,low12_graph,sweep)
  (( SMOKE )) && extra=(--steps 2 --warmup 1 --iters 1 --width 16 --threads 1 --batch-syn 0 --modes full,low,ref,low2,sweep)
  for ipc in ${AB_IPCS:-10 50}; do
    (( SMOKE )) && (( ipc == 50 )) && ipc=2
    # shellcheck disable=SC2086  # DATA_ARGS is a list of plain words
    "$PY" benchmarks/distill_ab.py $DATA_ARGS --device "$DEVICE" --ipc "$ipc" "${extra[@]}" \
        --json "$OUT/distill-ab-ipc$ipc.json" | tee "$OUT/distill-ab-ipc$ipc.md" || return 1
  done
}
export -f distill_ab
step "CUDA graph vs eager, and eager vs itself (IPC 10, N 30)" 90 "$PY" benchmarks/graph_check.py --device "$DEVICE" \
    "${GRAPH_ARGS[@]}" --out "$OUT/graph_check.json"
step "distill A/B: dpd full/low/low12 (eager and CUDA graphs) vs reference MTT, rho 0, interleaved (IPC 10 and 50, N 30)" 200 distill_ab

# ---------------------------------------------------------------- 5-7. syncs, GPU tests, two ranks on one GPU
SYNC_EX="${EXPERTS_ARG[1]:-}"
export SYNC_EX
if [[ -n "$SYNC_EX" ]]; then
  if (( SMOKE )); then S_ARGS=(--ipc 1 --steps 2 --iters 2); else S_ARGS=(--ipc 10 --steps 30 --iters 5); fi
  step "host syncs per distill iteration" 60 "$PY" benchmarks/sync_check.py --experts "$SYNC_EX" "${S_ARGS[@]}" \
      --device "$DEVICE" --out "$OUT/sync_check.json"
  gpu_tests() {
    "$PY" -c 'import pytest' 2>/dev/null || { echo "pytest is not installed: GPU tests not run"; return 0; }
    if (( SMOKE )); then echo "smoke: the GPU tests skip themselves without CUDA"; fi
    local rc=0
    "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short tests/ > "$OUT/pytest-gpu.log" 2>&1 || rc=$?
    tail -40 "$OUT/pytest-gpu.log"
    return "$rc"
  }
  export -f gpu_tests
  step "pytest -m gpu" 120 gpu_tests
fi
# Each mode in its own process (peak memory per mode), then dpd's training loops against a bare one.
step "speed.py distill, $DATA_NAME, IPC 10/50, N 30" 200 "$PY" benchmarks/speed.py "${SPEED_COMMON[@]}" "${DATA_ARR[@]}" \
    --only distill "${D_ARGS[@]}" "${EXPERTS_ARG[@]}" --out "$OUT/speed-distill.json"
step "speed.py experts+eval, $DATA_NAME" 150 "$PY" benchmarks/speed.py "${SPEED_COMMON[@]}" "${DATA_ARR[@]}" \
    --only experts,eval "${X_ARGS[@]}" --out "$OUT/speed-experts-eval.json"
if [[ -n "$SYNC_EX" ]]; then
  dp_one_gpu() {
    local dev=cuda:0 extra=(--ipc 10 --steps 30 --iters 3)
    (( SMOKE )) && { dev=cpu; extra=(--ipc 1 --steps 2 --iters 1 --threads 1); }
    "$PY" benchmarks/dp_bench.py --experts "$SYNC_EX" --device "$dev" "${extra[@]}" --out "$OUT/dp-one.json" || return 1
    OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/dp_bench.py \
        --experts "$SYNC_EX" --device "$dev" "${extra[@]}" --out "$OUT/dp-two.json" || return 1
    "$PY" - "$OUT/dp-one.json" "$OUT/dp-two.json" <<'PY' | tee "$OUT/dp.md"
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:3])
print(f"data parallel, IPC {one['ipc']}, N {one['steps']}, {one['gpu'] or 'cpu'}: 1 process {one['median_s']:.3f} s/it, "
      f"2 ranks on the same device {two['median_s']:.3f} s/it ({two['median_s'] / one['median_s']:.2f}x); peak per rank "
      + ", ".join(f"{r['peak_bytes'] / 2**30:.2f} GiB" for r in two["ranks"]) + f" vs {one['ranks'][0]['peak_bytes'] / 2**30:.2f} GiB")
PY
  }
  export -f dp_one_gpu
  step "torchrun 2 ranks on one device vs 1 process (dp_bench.py)" 120 dp_one_gpu
fi

# What --deterministic costs: full and low with cuDNN's deterministic algorithms, interleaved with the defaults.
det_ab() {
  local extra=(--ipc 10 --steps 30 --warmup 2 --iters 6 --batch-syn 0)
  (( SMOKE )) && extra=(--ipc 1 --steps 2 --warmup 1 --iters 1 --width 16 --threads 1 --batch-syn 0)
  # shellcheck disable=SC2086  # DATA_ARGS is a list of plain words
  "$PY" benchmarks/distill_ab.py $DATA_ARGS --device "$DEVICE" "${extra[@]}" --modes full,full_det,low,low_det \
      --json "$OUT/distill-ab-deterministic.json" | tee "$OUT/distill-ab-deterministic.md" || return 1
}
export -f det_ab
step "distill A/B: --deterministic (cuDNN deterministic algorithms) vs default, IPC 10, N 30" 70 det_ab
if (( ! SMOKE )); then
  step "speed.py distill, cudnn.benchmark on (IPC 10, N 30)" 90 "$PY" benchmarks/speed.py "${SPEED_COMMON[@]}" --cudnn-benchmark \
      "${DATA_ARR[@]}" --only distill --ipc 10 --steps 30 --modes full,low --iters 3 \
      --worker-timeout 60 "${EXPERTS_ARG[@]}" --out "$OUT/speed-distill-cudnn-benchmark.json"
fi

# ---------------------------------------------------------------- summary
{
  echo "# dpd GPU check — $GPU_NAME"
  echo
  "$PY" -c 'import torch, platform; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}")' 2>/dev/null
  echo "total wall time $(( SECONDS - START )) s of a ${BUDGET_S} s budget"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  while IFS=$'\t' read -r name status secs; do echo "| $name | $status | $secs |"; done < "$OUT/steps.tsv"
  echo
  [[ -f "$OUT/cuda_check.md" ]] && cat "$OUT/cuda_check.md" && echo
  if [[ -f "$OUT/experts-cli.json" ]]; then
    "$PY" - "$OUT/experts-cli.json" "$DATA_NAME" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    for e in s.get("experts", []):
        print(f"`dpd experts` on {sys.argv[2]}: {e['train_images_per_s']:.0f} training images/s over {e['epochs']} epochs "
              f"(as the CLI reports it: epoch time without test evaluation), final test accuracy {100 * e['final_test_accuracy']:.1f}%")
except Exception as err:  # noqa: BLE001
    print(f"(could not read {sys.argv[1]}: {err})")
PY
    echo
  fi
  for f in graph_check distill-ab-ipc10 distill-ab-ipc50 distill-ab-ipc2 distill-ab-deterministic speed-experts-eval speed-distill \
      speed-distill-cudnn-benchmark dp; do
    [[ -f "$OUT/$f.md" ]] && { echo "<!-- $f -->"; cat "$OUT/$f.md"; echo; }
  done
  if [[ -f "$OUT/sync_check.json" ]]; then
    "$PY" - "$OUT/sync_check.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for mode, r in d["modes"].items():
    print(f"host syncs per distill iteration ({mode}, IPC {d['ipc']}, N {d['steps']}): {r['per_iteration']:.1f}; "
          f"in one metrics flush: {r['syncs_in_flush']}; where: {r['where'] or 'nowhere'}")
PY
  fi
} > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "(everything is in $OUT/)"
