"""Round 5's table and plot (BENCHMARKS.md): each candidate at each budget, best first by top-1 + top-5.

Reads what ``tools/bench_round5.sh`` and ``tools/bench_retrieval.py`` wrote under OUT
(``<N>min/<backbone>@<size>/result-*.json``, and a setting's runs one folder deeper,
``<N>min[-stage]/<backbone>@<size>/<setting>/``) and prints one Markdown row per candidate, setting and
budget: its pairs/s, pairs, seeds, top-1 / 5 / 20 with 95 % intervals (seeds and queries resampled:
:func:`street2shop.experiments.bootstrap`), the training minutes of each seed and the load when each started.

``--plot PATH`` draws top-1 against training minutes, one line per backbone and input size, from the runs
of the recipe itself: a folder without a setting, and a run with ``--set ema_momentum=M`` through the
weights it trained (its ``trained_weights``: the average never steers a step, so they are the run
without it). The minutes are the pairs over the candidate's quiet rate (:func:`quiet_rates`), not the
wall time, which depends on what else the machine was doing.

    .venv/bin/python tools/round5_table.py bench-output/round5 --plot docs/benchmarks/round5-minutes.png
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
REFERENCE = "inception_v3@96"  # the candidate whose quiet whole-run rate (round 4) the others are scaled to


def runs_in(folder: Path) -> list[dict]:
    return sorted((json.loads(f.read_text()) for f in folder.glob(f"result-{VARIANT}-seed*.json")), key=lambda r: r["seed"])


def folders_of(budget: Path) -> list[tuple[str, str, Path]]:
    """(candidate, setting, folder) of every folder under a budget that holds runs; setting "" for the recipe itself."""
    found = []
    for candidate in sorted(p for p in budget.iterdir() if p.is_dir()):
        if runs_in(candidate):
            found.append((candidate.name, "", candidate))
        for setting in sorted(p for p in candidate.iterdir() if p.is_dir() and runs_in(p)):
            found.append((candidate.name, setting.name, setting))
    return found


def rows_of(budget: Path, rates: dict[str, float]) -> list[tuple[float, str]]:
    rows: list[tuple[float, str]] = []
    for candidate, setting, folder in folders_of(budget):
        runs = runs_in(folder)
        rows += [row(budget, candidate, setting, runs, rates)]
        trained = trained_weights(runs) if setting.startswith("ema_momentum=") else []  # the same runs without their average
        if trained:
            rows += [row(budget, candidate, f"{setting}#trained_weights", trained, rates)]
    return sorted(rows, reverse=True)


def trained_weights(runs: list[dict]) -> list[dict]:
    """Runs with a moving average of their weights, evaluated through the weights they trained (bench_retrieval's ``trained_weights``)."""
    return [{**r, **r["trained_weights"]} for r in runs if "trained_weights" in r]


def row(budget: Path, candidate: str, setting: str, runs: list[dict], rates: dict[str, float]) -> tuple[float, str]:
    """One Markdown row of runs: its score (top-1 + top-5, to sort by) and the row."""
    hits = per_query(runs)
    cells = []
    for name in ("top-1", "top-5", "top-20"):
        mean, low, high = bootstrap(hits[name])
        cells.append(f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
    minutes = ", ".join(f"{r['train_seconds'] / 60:.0f}" for r in runs)
    load = ", ".join(f"{r['uptime'][0]:.1f}" for r in runs if r.get("uptime"))
    score = sum(r["top_k"]["1"] + r["top_k"]["5"] for r in runs) / len(runs)
    name = f"{candidate} {setting}".strip()
    return (score, f"| {budget.name} | {name} | {rates.get(candidate, '?')} | {runs[0]['pairs']:,} | "
                   f"{', '.join(str(r['seed']) for r in runs)} | {' | '.join(cells)} | {minutes} | {load} |")


def budget_rates(out: Path, budget: str) -> dict[str, float]:
    """The pairs/s a stage's budgets were set from: ``budgets-<N>min.json``, else ``budgets.json`` (as bench_round5.sh reads them)."""
    path = out / f"budgets-{budget}.json"
    if not path.is_file():
        path = out / "budgets.json"
    return json.loads(path.read_text())["pairs_per_s"] if path.is_file() else {}


def quiet_rates(out: Path) -> dict[str, float]:
    """Each candidate's pairs/s over a whole run on quiet cores, as well as it was measured.

    The 28-minute budgets' rates (short epochs side by side, scaled so that InceptionV3 @96 runs at
    round 4's quiet whole-run rate), replaced, for the candidates measured at full epochs side by side
    (``pairs-per-s-full-epochs.json``), by their full-epoch ratio to InceptionV3 @96 at the same scale:
    short epochs were kind to DenseNet-121 (0.67 of InceptionV3 against 0.59 at full epochs).
    """
    rates = dict(budget_rates(out, "28min"))
    full = out / "pairs-per-s-full-epochs.json"
    if full.is_file() and REFERENCE in rates:
        measured = json.loads(full.read_text())["pairs_per_s"]
        if REFERENCE in measured:
            rates.update({c: round(rates[REFERENCE] * v / measured[REFERENCE], 2) for c, v in measured.items()})
    return rates


def curves(out: Path, rates: dict[str, float]) -> dict[str, list[tuple[float, float, float, float, int]]]:
    """candidate -> [(minutes, top-1 mean, low, high, seeds)] of the recipe's own runs, by minutes."""
    points: dict[str, list] = {}
    for budget in sorted(p for p in out.iterdir() if p.is_dir() and p.name.split("-")[0].endswith("min")):
        for candidate, setting, folder in folders_of(budget):
            runs = runs_in(folder)
            if setting.startswith("ema_momentum="):
                runs = trained_weights(runs)
            elif setting:
                continue  # another recipe than the base: a lever, not a point of the curve
            if not runs or candidate not in rates:
                continue
            mean, low, high = bootstrap(per_query(runs)["top-1"])
            minutes = runs[0]["pairs"] / rates[candidate] / 60
            points.setdefault(candidate, []).append((minutes, 100 * mean, 100 * low, 100 * high, len(runs)))
    return {c: sorted(p) for c, p in points.items()}


def plot(points: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for candidate, rows in sorted(points.items(), key=lambda item: -max(r[1] for r in item[1])):
        x = [r[0] for r in rows]
        y = [r[1] for r in rows]
        err = [[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]]
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=candidate)
        for minutes, top1, _, _, seeds in rows:
            ax.annotate(f"{seeds} seed{'s' if seeds > 1 else ''}", (minutes, top1), textcoords="offset points", xytext=(5, -10),
                        fontsize=7, color=line[0].get_color())
    ax.axvline(30, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training minutes on 2 quiet cores (pairs / measured pairs per second)")
    ax.set_ylabel("top-1 on grocery val (%), 95 % interval")
    ax.set_title("Round 5: what each backbone learns in the time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder bench_round5.sh wrote (OUT)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw top-1 against training minutes per candidate here")
    parser.add_argument("--point", action="append", default=[], metavar="CANDIDATE:PAIRS:TOP1:LOW:HIGH:SEEDS",
                        help="a run measured elsewhere, for the plot (percent), e.g. round 4's v1: inception_v3@96:49152:24.1:19.4:29.4:3")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a folder (the OUT bench_round5.sh wrote)")
    print("| budget | candidate | pairs/s | pairs | seeds | top-1 | top-5 | top-20 | train min (each seed) | load at start |")
    print("|---|---|---:|---:|---|---|---|---|---|---|")
    budgets = [p for p in args.out.iterdir() if p.is_dir() and p.name.split("-")[0].endswith("min")]
    for budget in sorted(budgets, key=lambda d: (int(d.name.split("-")[0][:-3]), d.name)):
        for _, row in rows_of(budget, budget_rates(args.out, budget.name.split("-")[0])):
            print(row)
    print("\nBrackets: 95 % bootstrap interval resampling the seeds and the queries (the queries alone for one seed). "
          "Training minutes are wall time on shared cores: the budgets are pairs, fixed from each candidate's pairs/s.")
    if args.plot:
        rates = quiet_rates(args.out)
        points = curves(args.out, rates)
        for point in args.point:
            try:
                candidate, pairs, *numbers, seeds = point.split(":")
                top1, low, high = map(float, numbers)
                points.setdefault(candidate, []).append((int(pairs) / rates[candidate] / 60, top1, low, high, int(seeds)))
            except (ValueError, KeyError):
                parser.error(f"--point {point}: expected CANDIDATE:PAIRS:TOP1:LOW:HIGH:SEEDS with a candidate of known rate "
                             f"({', '.join(sorted(rates))})")
            points[candidate].sort()
        plot(points, args.plot)
        print(f"\n{args.plot}: top-1 against pairs / quiet pairs per second, from {', '.join(f'{c} {rates[c]}' for c in points)} pairs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
