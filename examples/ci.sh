#!/usr/bin/env bash
# A whole CI job on the embedded dataset: train experts, distil, and block the pipeline if the
# distilled set's accuracy regresses. Run from the repository root:
#     bash examples/ci.sh
# Exit codes: 0 ok, 2 bad settings or input, 3 accuracy below the gate, 130 interrupted.
set -euo pipefail

WORK="${WORK:-ci-work}"
GATE="${GATE:-60}"   # minimum mean test accuracy (%) of the distilled set

export DPD_EXPERTS_ROOT="$WORK/experts"   # keep everything of this job in one folder

dpd experts  --config examples/quick.toml --quiet
dpd distill  --config examples/quick.toml --ipc 1 --out "$WORK/run" --force --quiet
dpd evaluate "$WORK/run" --config examples/quick.toml --runs 2 --baseline random --json --fail-under "$GATE" > "$WORK/eval-result.json"

python3 - "$WORK/eval-result.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
for e in result["results"]:
    print(f"{e['source']:>9} {e['model']:<8} {100 * e['mean']:.2f} ± {100 * e['std']:.2f} %  ({e['runs']} runs)")
PY
