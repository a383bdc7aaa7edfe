#!/usr/bin/env bash
# One prepared run for a GPU machine (possibly offline). From the repository root:
#
#     bash benchmarks/gpu_check.sh [CIFAR_TGZ]   # default data/cifar10-jpeg.tar.gz; without it, the embedded set
#     bash benchmarks/gpu_check.sh --smoke       # every step at toy size on the CPU (validates this script)
#     bash benchmarks/gpu_check.sh --scale [TGZ] # only DPD against MTT at MTT's CIFAR-10 scale (dpd_study.py --plan scale)
#
# Results in ${OUT:-bench-out}/: gpu_check.log, steps.tsv, a JSON + Markdown file per measurement. Each step
# runs under `timeout`, cut to what is left of BUDGET_S (default 480); SKIP='regex' leaves out matching steps.
# If `import torch` fails, .whl/*.whl are installed; the package is used from PYTHONPATH (pure Python).
set -uo pipefail
[[ "${1:-}" == --help || "${1:-}" == -h ]] && { sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0; }
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
SMOKE=0; [[ "${1:-}" == "--smoke" ]] && { SMOKE=1; shift; }
SCALE=0; [[ "${1:-}" == "--scale" ]] && { SCALE=1; shift; }  # the scale step alone
OUT="${OUT:-bench-out}"; TGZ="${1:-data/cifar10-jpeg.tar.gz}"; BUDGET_S="${BUDGET_S:-$(( SCALE ? 560 : 480 ))}"; PY="${PYTHON:-python3}"
WORK="$(mktemp -d /tmp/dpd-gpu-check.XXXX)"; START=$SECONDS; FAILED=0
mkdir -p "$OUT" && rm -f "$OUT/steps.tsv" && exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DPD_EXPERTS_ROOT="$WORK/ex" DPD_CACHE_ROOT="$WORK/cache" NO_COLOR=1

step() {  # step NAME MAX_SECONDS COMMAND...: timed, logged, bounded by the budget
  local name=$1 max=$2 left=$(( BUDGET_S - SECONDS + START )) scale=0; shift 2; [[ $name == "dpd study"* ]] && scale=1
  if [[ -n "${SKIP:-}" && "$name" =~ $SKIP ]] || (( left < 15 || scale != SCALE )); then printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"; return; fi
  echo "=== $name"; local t0=$SECONDS; timeout -k 10 $(( max < left ? max : left )) "$@"; local rc=$?
  (( rc )) && FAILED=1
  printf '%s\t%s\t%s\n' "$name" "$([[ $rc == 0 ]] && echo ok || echo "FAILED ($rc)")" "$(( SECONDS - t0 ))" >> "$OUT/steps.tsv"
}

if (( SMOKE )); then
  COMMON=(--device cpu --threads 1 --width 8); DATA=(--dataset fashion-mnist-mini); IPCS=1; N=2; ROUNDS=(--warmup 1 --iters 1); K=low1; DMODES=full,low1; GPU_TESTS=tests/test_gpu.py
  EX_ARGS=(--train-per-class 20)
  X_ARGS=(--expert-images 128 --expert-reps 1 --eval-ipc 1 --eval-epochs 2 --eval-reps 1)
else
  "$PY" -c 'import torch' 2>/dev/null || "$PY" -m pip install --no-index --find-links .whl .whl/*.whl
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  COMMON=(--device cuda); IPCS=10,50; N=30; ROUNDS=(--warmup 3 --iters 10); K=low12; DMODES=full,low,low12,ref; GPU_TESTS=tests/; EX_ARGS=()
  X_ARGS=(--expert-images 25600 --expert-reps 3 --eval-epochs 50 --eval-reps 3)
  DATA=(--dataset fashion-mnist-mini)
  if [[ -f "$TGZ" ]] && mkdir -p "$WORK/cifar" && tar -xzf "$TGZ" -C "$WORK/cifar"; then
    D="$WORK/cifar"; [[ -d "$D/train" ]] || D="$D/$(ls "$D" | head -1)"; DATA=(--dataset imagefolder --data-dir "$D")
  fi
fi
SPEED=("$PY" benchmarks/speed.py "${COMMON[@]}")
echo "data: ${DATA[*]}; GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo none)"

step "pytest -m gpu (CUDA vs CPU, graph replay vs eager, host syncs)" 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider "$GPU_TESTS"
step "dpd experts: 1 expert, 2 epochs (its JSON: images/s)" 150 "$PY" -m dpd_cli experts "${DATA[@]}" --num 1 --epochs 2 \
    --width "$( (( SMOKE )) && echo 8 || echo 128)" "${EX_ARGS[@]}" --device "${COMMON[1]}" --out "$WORK/experts" --quiet --json
GRAPHS=$( (( SMOKE )) || echo ",full_graph,low_graph,${K}_graph")
step "A/B interleaved: dpd vs reference MTT, rho 0" 200 "${SPEED[@]}" "${DATA[@]}" --only ab --ipc "$IPCS" --steps "$N" --batch-syn 0 \
    "${ROUNDS[@]}" --modes "full,low,$K,ref,sweep$GRAPHS" --out "$OUT/speed-ab.json"
step "A/B --deterministic" 70 "${SPEED[@]}" "${DATA[@]}" --only ab --ipc "${IPCS%%,*}" --steps "$N" --batch-syn 0 --warmup 1 --iters 3 \
    --modes full,full_det,low,low_det --out "$OUT/speed-ab-deterministic.json"
step "distill, each mode in its own process" 200 "${SPEED[@]}" "${DATA[@]}" --only distill --ipc "$IPCS" --steps "$N" --iters 3 \
    --modes "$DMODES" --experts "$WORK/experts" --worker-timeout 150 --out "$OUT/speed-distill.json"
step "experts and evaluation training vs a bare loop" 150 "${SPEED[@]}" "${DATA[@]}" --only experts,eval "${X_ARGS[@]}" --out "$OUT/speed-experts-eval.json"
step "batched: experts, evaluation networks and distillations (IPC ${IPCS%%,*}, N $N), K at once vs one at a time" 150 \
    "${SPEED[@]}" "${DATA[@]}" --only batched "${X_ARGS[@]}" --concurrent "$( (( SMOKE )) && echo 2 || echo 8)" \
    --experts "$WORK/experts" --ipc "${IPCS%%,*}" --steps "$N" "${ROUNDS[@]}" --out "$OUT/speed-batched.json"
step "data parallel: 2 torchrun ranks on one device" 120 env OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node 2 benchmarks/speed.py "${COMMON[@]}" --only dp --experts "$WORK/experts" --ipc "${IPCS%%,*}" \
    --steps "$N" "${ROUNDS[@]}" --modes full --out "$OUT/speed-dp2.json"
step "data parallel: 1 process" 60 "${SPEED[@]}" --only dp --experts "$WORK/experts" --ipc "${IPCS%%,*}" --steps "$N" "${ROUNDS[@]}" \
    --modes full --out "$OUT/speed-dp1.json"
(( SMOKE )) || step "distill with cudnn.benchmark" 90 "${SPEED[@]}" "${DATA[@]}" --cudnn-benchmark --only distill --ipc 10 --steps 30 \
    --iters 3 --modes full,low --experts "$WORK/experts" --out "$OUT/speed-distill-cudnn-benchmark.json"
# The scale answer (with --scale only): sizes that fit 9 minutes; SCALE_ARGS='' runs dpd_study.py's minimum sizes.
(( SCALE )) && step "dpd study at MTT's CIFAR-10 scale" 545 "$PY" benchmarks/dpd_study.py --plan scale --cifar10-dir "$TGZ" \
    --out "$OUT/dpd-scale" ${SCALE_ARGS---experts 10 --expert-epochs 24 --iterations 250 --eval-runs 1}

echo "=== $(( SECONDS - START )) s"; column -t -s $'\t' "$OUT/steps.tsv"; rm -rf "$WORK"
exit "$FAILED"
