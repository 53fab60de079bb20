#!/usr/bin/env bash
# Round 5 (BENCHMARKS.md): backbone x input size at equal training time, for the 30-minute recipe.
# Runs for hours; every step is resumable (bench_retrieval skips finished results and resumes a killed
# training), so run it again after an interruption and it goes on where it stopped. Stages:
#   0. budgets: each candidate's pairs for MINUTES of training, from its measured pairs/s
#      (tools/bench_train.py --candidates, written to $OUT/pairs-per-s.json), fixed once per budget in
#      $OUT/budgets-<MINUTES>min.json (else $OUT/budgets.json), so a later, better measurement of the rates
#      sets the next stage's budgets without changing what an earlier stage ran;
#   1. screen: every candidate at a 10-minute budget, seed 0, the recipe's variant (robust + COIL-100 + product softmax);
#   2. full: the screen's best FINALISTS (by top-1 + top-5) and the recipe's own backbone at the 28-minute budget, seeds 0 1 2;
#   3. check: the winner's BatchNorm momentum and learning rate, each of CHECKS at the 10-minute budget, seed 0
#      ($OUT/10min-check/<winner>/<setting>), against the screen's run of it;
#   4. levers: each of LEVERS on the winner at the 28-minute budget, seeds 0 1 2 ($OUT/28min-levers/<winner>/<setting>).
#   The winner is WINNER, else the best at 28 minutes by top-1 + top-5 over its seeds. A setting is bench_retrieval.py's
#   arguments with ':' for spaces ("--learning-rate:2e-3", "--set:ema_momentum=0.99"); its folder is named after them.
# The table of every candidate and budget: tools/round5_table.py $OUT; a setting against its base: tools/compare_runs.py.
# Usage: tools/bench_round5.sh screen | full | check | levers | summary   (PY=the python to use, RECIPE=the base recipe)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RECIPE=${RECIPE:-configs/grocery-30min-v1.toml}
OUT=${OUT:-bench-output/round5}
CANDIDATES=${CANDIDATES:-"inception_v3@96 inception_v3@128 resnet50@96 resnet50@128 mobilenet_v3_large@128 mobilenet_v3_large@160 mobilenet_v3_large@192 efficientnet_b0@128 densenet121@96"}
FINALISTS=${FINALISTS:-2}
WITH_BASE=${WITH_BASE:-1}   # 0: the full stage leaves out the recipe's own backbone (its 28-minute seeds measured elsewhere)
CHECKS=${CHECKS:-"--bn-momentum:0.99 --learning-rate:5e-4 --learning-rate:2e-3"}
LEVERS=${LEVERS:-"--set:ema_momentum=0.99 --w-product:1.0 --embedding-dim:256"}
PAIRS_PER_EPOCH=2048

budgets_file() {  # minutes -> the budgets that stage uses
  if [ -f "$OUT/budgets-${1}min.json" ]; then echo "$OUT/budgets-${1}min.json"; else echo "$OUT/budgets.json"; fi
}

budget() {  # candidate minutes -> "pairs epochs"
  "$PY" - "$(budgets_file "$2")" "$1" "$2" "$PAIRS_PER_EPOCH" <<'EOF'
import json, sys
budgets, candidate, minutes, per_epoch = json.load(open(sys.argv[1])), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
pairs = budgets["pairs_per_s"][candidate] * 60 * minutes
epochs = max(4, round(pairs / per_epoch))
print(int(pairs // (32 * epochs)) * 32 * epochs, epochs)
EOF
}

run() {  # candidate minutes setting seeds... ; one --out per candidate, budget and setting ("" for none)
  local candidate=$1 minutes=$2 setting=$3 out extra=(); shift 3
  out="$OUT/${minutes}min/$candidate"
  if [ -n "$setting" ]; then
    read -r -a extra <<< "${setting//:/ }"
    out="$OUT/${minutes}min-$STAGE/$candidate/$(echo "${setting#--}" | sed 's/^set://; s/:/=/')"
  fi
  read -r pairs epochs < <(budget "$candidate" "$minutes")
  echo "== $(date -Is) $candidate ${setting}, ${minutes} min: $pairs pairs in $epochs epochs, seeds $*, load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$PY" tools/bench_retrieval.py --config "$RECIPE" --variants robust_multitask_products --seeds "$@" \
    --backbone "${candidate%@*}" --image-size "${candidate#*@}" --pairs "$pairs" --epochs "$epochs" \
    "${extra[@]}" --out "$out"
}

winner() {  # the best candidate at 28 minutes by mean top-1 + top-5 over its seeds (or WINNER)
  if [ -n "${WINNER:-}" ]; then echo "$WINNER"; return; fi
  "$PY" - "$OUT/28min" <<'EOF'
import json, pathlib, sys
scores = {}
for d in pathlib.Path(sys.argv[1]).glob("*"):
    runs = [json.loads(f.read_text())["top_k"] for f in d.glob("result-robust_multitask_products-seed*.json")]
    if runs:
        scores[d.name] = sum(r["1"] + r["5"] for r in runs) / len(runs)
if not scores:
    sys.exit(f"error: no candidate has finished a seed in {sys.argv[1]}: run the full stage first, or set WINNER")
print(max(scores, key=scores.get))
EOF
}

case ${1:-} in
  screen)
    [ -f "$(budgets_file 10)" ] || cp "$OUT/pairs-per-s.json" "$OUT/budgets-10min.json"
    for c in $CANDIDATES; do run "$c" 10 "" 0; done ;;
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
    [ -f "$(budgets_file 28)" ] || cp "$OUT/pairs-per-s.json" "$OUT/budgets-28min.json"
    [ "$WITH_BASE" = 1 ] || base=""
    for c in $finalists $base; do run "$c" 28 "" 0 1 2; done ;;
  check)
    STAGE=check; w=$(winner); echo "== winner: $w"
    for s in $CHECKS; do run "$w" 10 "$s" 0; done
    "$PY" tools/compare_runs.py "$OUT/10min/$w" "$OUT/10min-check/$w"/* ;;
  levers)
    STAGE=levers; w=$(winner); echo "== winner: $w"
    for s in $LEVERS; do run "$w" 28 "$s" 0 1 2; done
    "$PY" tools/compare_runs.py "$OUT/28min/$w" "$OUT/28min-levers/$w"/* ;;
  summary)
    for d in "$OUT"/*min/* "$OUT"/*min-*/*/*; do [ -d "$d" ] || continue; "$PY" tools/bench_retrieval.py --summary --out "$d" > /dev/null; done ;;
  *) echo "usage: $0 screen | full | check | levers | summary" >&2; exit 2 ;;
esac
echo "== $(date -Is) done: $1"
