"""Round 5's table (BENCHMARKS.md): each candidate at each budget, best first by top-1 + top-5.

Reads what ``tools/bench_round5.sh`` wrote (``OUT/<N>min/<backbone>@<size>/result-*.json`` and
``OUT/budgets.json``) and prints one Markdown row per candidate and budget: its pairs/s, pairs, seeds,
top-1 / 5 / 20 with 95 % intervals (seeds and queries resampled: :func:`street2shop.experiments.bootstrap`),
the training minutes of each seed and the load when each started.

    .venv/bin/python tools/round5_table.py bench-output/round5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from street2shop.experiments import bootstrap, per_query  # noqa: E402

VARIANT = "robust_multitask_products"


def rows_of(budget: Path, rates: dict[str, float]) -> list[tuple[float, str]]:
    rows = []
    for folder in sorted(p for p in budget.iterdir() if p.is_dir()):
        runs = sorted((json.loads(f.read_text()) for f in folder.glob(f"result-{VARIANT}-seed*.json")), key=lambda r: r["seed"])
        if not runs:
            continue
        hits = per_query(runs)
        cells = []
        for name in ("top-1", "top-5", "top-20"):
            mean, low, high = bootstrap(hits[name])
            cells.append(f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
        minutes = ", ".join(f"{r['train_seconds'] / 60:.0f}" for r in runs)
        load = ", ".join(f"{r['uptime'][0]:.1f}" for r in runs if r.get("uptime"))
        score = sum(r["top_k"]["1"] + r["top_k"]["5"] for r in runs) / len(runs)
        rows.append((score, f"| {budget.name} | {folder.name} | {rates.get(folder.name, '?')} | {runs[0]['pairs']:,} | "
                            f"{', '.join(str(r['seed']) for r in runs)} | {' | '.join(cells)} | {minutes} | {load} |"))
    return sorted(rows, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder bench_round5.sh wrote (OUT)")
    args = parser.parse_args()
    rates = json.loads((args.out / "budgets.json").read_text())["pairs_per_s"]
    print("| budget | candidate | pairs/s | pairs | seeds | top-1 | top-5 | top-20 | train min (each seed) | load at start |")
    print("|---|---|---:|---:|---|---|---|---|---|---|")
    for budget in sorted(args.out.glob("*min"), key=lambda d: int(d.name[:-3])):
        for _, row in rows_of(budget, rates):
            print(row)
    print("\nBrackets: 95 % bootstrap interval resampling the seeds and the queries (the queries alone for one seed). "
          "Training minutes are wall time on shared cores: the budgets are pairs, fixed from each candidate's pairs/s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
