#!/usr/bin/env bash
# The label-noise benchmark (BENCHMARKS.md, "Round 3"): robust vs plain contrastive loss when a share p
# of the training street photos carry another product's label. Runs for hours; every step is resumable,
# so run it again after an interruption and it goes on where it stopped. Stages, in order:
#   1. screen: the drop rules (robust = batch quantile 0.9, robust_matched = quantile 1 - p,
#      robust_tau_warmup = fixed τ after 2 plain epochs) against plain at p = 0.4, 2 seeds, in both
#      regimes: from scratch, and fine-tuning a tower first trained on COIL-100 alone (--pretrain aux);
#   2. the rule and regime with the largest gain over plain in the screen (top-1 + top-5 points,
#      chosen by `--noise-summary --choose`): plain vs that rule, 4 seeds, at p = 0.4, 0.2 and 0;
#   3. the best recipe's pair at p = 0.4 (that rule vs plain, both with the COIL-100 and product softmaxes);
#   4. the same comparison as 2 under same-category noise at p = 0.4;
#   then the summary over every folder: bench-output/noise-summary/{noise-summary.md,noise.png}.
# Usage: tools/bench_noise.sh  (KIND=uniform by default; PY=the python to use)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
KIND=${KIND:-uniform}
OUT=bench-output
RULES="robust robust_matched robust_tau_warmup"
bench() { "$PY" tools/bench_retrieval.py "$@"; }
folder() { echo "$OUT/noise-$1-$2-p$3"; }   # regime, kind, p
regime_flags() { [ "$1" = aux ] && echo "--pretrain aux" || echo "--pretrain none"; }
echo "== $(date -Is) label-noise benchmark, $KIND noise"

# 1. The screen, seed by seed so that both regimes have a seed early.
for seed in 0 1; do
  for regime in scratch aux; do
    bench --noise-rate 0.4 --noise-kind "$KIND" $(regime_flags $regime) --variants plain $RULES --seeds $seed \
      --out "$(folder $regime "$KIND" 0.4)"
  done
done
choice=$(bench --noise-summary "$(folder scratch "$KIND" 0.4)" "$(folder aux "$KIND" 0.4)" --choose --out "$OUT/noise-screen")
echo "== $(date -Is) screen choice: $choice"
[ "$choice" != null ] || { echo "the screen's rules share no seed: finish the screen first" >&2; exit 1; }
regime=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["pretrain"])' "$choice")
rule=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["variant"])' "$choice")
[ "$regime" = aux ] || regime=scratch

# 2. Plain vs the chosen rule, 4 seeds, at p = 0.4 (seeds 0 and 1 are the screen's), 0.2 and 0. At p = 0 the
# matched rules drop nothing (q = 1, τ = 2): they are the plain loss, so only plain and the default rule run.
bench --noise-rate 0.4 --noise-kind "$KIND" $(regime_flags $regime) --variants plain $rule --seeds 0 1 2 3 --out "$(folder $regime "$KIND" 0.4)"
bench --noise-rate 0.2 --noise-kind "$KIND" $(regime_flags $regime) --variants plain $rule --seeds 0 1 2 3 --out "$(folder $regime "$KIND" 0.2)"
zero="plain"; [ "$rule" = robust ] && zero="plain robust"
bench --noise-rate 0 $(regime_flags $regime) --variants $zero --seeds 0 1 2 3 --out "$(folder $regime none 0)"

# 3. The best recipe's pair at p = 0.4: the rule with the COIL-100 and product softmaxes, against plain with them.
case $rule in
  robust) recipe=robust_multitask_products ;;
  *) recipe=${rule}_multitask_products ;;
esac
bench --noise-rate 0.4 --noise-kind "$KIND" $(regime_flags $regime) --variants plain_multitask_products $recipe --seeds 0 1 2 3 \
  --out "$(folder $regime "$KIND" 0.4)"

# 4. Same-category noise (a mis-click, a near-duplicate listing) at p = 0.4.
other=same-category; [ "$KIND" = same-category ] && other=uniform
bench --noise-rate 0.4 --noise-kind $other $(regime_flags $regime) --variants plain $rule --seeds 0 1 2 3 --out "$(folder $regime $other 0.4)"

bench --noise-summary $(ls -d $OUT/noise-*-p* ) --out "$OUT/noise-summary" > /dev/null
for d in $OUT/noise-*-p*; do bench --summary --out "$d" > /dev/null; done
echo "== $(date -Is) done: $OUT/noise-summary/noise-summary.md"
