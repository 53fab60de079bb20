#!/usr/bin/env bash
# Round 5 (BENCHMARKS.md): backbone x input size at equal training time, for the 30-minute recipe.
# Runs for hours; every step is resumable (bench_retrieval skips finished results and resumes a killed
# training), so run it again after an interruption and it goes on where it stopped. Stages:
#   0. budgets: each candidate's pairs for MINUTES of training, from its measured pairs/s
#      (tools/bench_train.py --candidates, written to $OUT/pairs-per-s.json), fixed once in $OUT/budgets.json;
#   1. screen: every candidate at a 10-minute budget, seed 0, the recipe's variant (robust + COIL-100 + product softmax);
#   2. full: the screen's best FINALISTS (by top-1 + top-5) and the recipe's own backbone at the 28-minute budget, seeds 0 1 2.
# The table of every candidate and budget: tools/round5_table.py $OUT.
# Usage: tools/bench_round5.sh screen | full | summary   (PY=the python to use, RECIPE=the base recipe)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RECIPE=${RECIPE:-configs/grocery-30min-v1.toml}
OUT=${OUT:-bench-output/round5}
CANDIDATES=${CANDIDATES:-"inception_v3@96 inception_v3@128 resnet50@96 resnet50@128 mobilenet_v3_large@128 mobilenet_v3_large@160 mobilenet_v3_large@192 efficientnet_b0@128 densenet121@96"}
FINALISTS=${FINALISTS:-2}
PAIRS_PER_EPOCH=2048

budget() {  # candidate minutes -> "pairs epochs"
  "$PY" - "$OUT/budgets.json" "$1" "$2" "$PAIRS_PER_EPOCH" <<'EOF'
import json, sys
budgets, candidate, minutes, per_epoch = json.load(open(sys.argv[1])), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
pairs = budgets["pairs_per_s"][candidate] * 60 * minutes
epochs = max(4, round(pairs / per_epoch))
print(int(pairs // (32 * epochs)) * 32 * epochs, epochs)
EOF
}

run() {  # candidate minutes seeds... ; one --out per candidate and budget
  local candidate=$1 minutes=$2; shift 2
  read -r pairs epochs < <(budget "$candidate" "$minutes")
  echo "== $(date -Is) $candidate, ${minutes} min: $pairs pairs in $epochs epochs, seeds $*, load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PY" tools/bench_retrieval.py --config "$RECIPE" --variants robust_multitask_products --seeds "$@" \
    --backbone "${candidate%@*}" --image-size "${candidate#*@}" --pairs "$pairs" --epochs "$epochs" \
    --out "$OUT/${minutes}min/$candidate"
}

case ${1:-} in
  screen)
    [ -f "$OUT/budgets.json" ] || cp "$OUT/pairs-per-s.json" "$OUT/budgets.json"
    for c in $CANDIDATES; do run "$c" 10 0; done ;;
  full)
    ranked=$("$PY" - "$OUT/10min" <<'EOF'
import json, pathlib, sys
scores = {}
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    for f in d.glob("result-robust_multitask_products-seed0.json"):
        top = json.loads(f.read_text())["top_k"]
        scores[d.name] = top["1"] + top["5"]
print(" ".join(sorted(scores, key=scores.get, reverse=True)))
EOF
)
    echo "== screen ranking (top-1 + top-5): $ranked"
    base="$(grep -E '^backbone' "$RECIPE" | cut -d'"' -f2)@$(grep -E '^image_size' "$RECIPE" | tr -dc 0-9)"
    finalists=$(echo "$ranked" | tr ' ' '\n' | head -n "$FINALISTS" | tr '\n' ' ')
    for c in $finalists $base; do run "$c" 28 0 1 2; done ;;
  summary)
    for d in "$OUT"/*min/*; do "$PY" tools/bench_retrieval.py --summary --out "$d" > /dev/null; done ;;
  *) echo "usage: $0 screen | full | summary" >&2; exit 2 ;;
esac
echo "== $(date -Is) done: $1"
