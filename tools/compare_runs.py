"""Paired differences between benchmark folders: each OTHER folder's runs against BASE's, seed by seed and query by query.

Every folder is one ``tools/bench_retrieval.py --out`` (for example one round-5 candidate, or one lever
run with ``--set``). The same seed and the same query pair up (the evaluation split is the same), so a
difference's interval resamples seeds and queries together (:func:`street2shop.experiments.paired_difference`)
and is far narrower than the two intervals side by side. Only the seeds both folders finished count.

    .venv/bin/python tools/compare_runs.py bench-output/round5/28min/densenet121@96 \\
        bench-output/round5/28min-levers/densenet121@96/ema_momentum=0.99

A run with ``--set ema_momentum=M`` also records the same run's trained weights without their
average (``trained_weights`` in its result): ``FOLDER#trained_weights`` reads those, so

    .venv/bin/python tools/compare_runs.py F#trained_weights F

is the average's gain with training itself held fixed (the average never steers a step). And
``VIEWS.json#CONDITION`` reads the runs of one condition of a ``tools/bench_views.py --out`` file, e.g.
two recipes as deployed, with their test-time augmentation:

    .venv/bin/python tools/compare_runs.py bench-output/round5/28min/densenet121@96/views.json#tta-flip-crops \\
        bench-output/round5/30min/densenet121@96/ema_momentum=0.99/views.json#tta-flip-crops
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from street2shop.experiments import paired_difference  # noqa: E402


def results_of(folder: Path, variant: str, name: str) -> list[dict]:
    """The folder's finished runs of ``variant``, renamed ``name`` so two folders can be paired.

    ``FOLDER#KEY``: each run's evaluation recorded under ``KEY`` (``trained_weights``) instead of its own.
    """
    folder_name, _, key = str(folder).partition("#")
    folder = Path(folder_name)
    if folder.suffix == ".json":
        return [{**run, "variant": name} for run in views_of(folder, key)]
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob(f"result-{variant}-seed*.json"))]
    if not runs:
        raise SystemExit(f"error: {folder} holds no finished run of {variant} (result-{variant}-seed*.json); "
                         f"is it a bench_retrieval.py --out folder, and has a seed finished?")
    if key:
        missing = [run["seed"] for run in runs if key not in run]
        if missing:
            raise SystemExit(f"error: {folder}'s runs of seeds {missing} record no {key!r} (only a run with "
                             f"--set ema_momentum=M records trained_weights)")
        runs = [{**run, **run[key]} for run in runs]
    return [{**run, "variant": name} for run in runs]


def views_of(path: Path, condition: str) -> list[dict]:
    """The runs of one condition in a ``bench_views.py`` file (``runs``: seed -> condition -> evaluation)."""
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {path} is not a bench_views.py --out file ({e})")
    found = [{**by_condition[condition], "seed": int(seed)} for seed, by_condition in runs.items() if condition in by_condition]
    if not found:
        conditions = sorted({c for by_condition in runs.values() for c in by_condition})
        raise SystemExit(f"error: {path} has no runs of condition {condition!r}; it has: {', '.join(conditions) or 'none'}")
    return found


def rows(base: Path, others: list[Path], variant: str) -> list[str]:
    base_runs = results_of(base, variant, "base")
    lines = []
    for other in others:
        runs = base_runs + results_of(other, variant, "other")
        cells, per_seed = [], {}
        for k in (1, 5):
            difference = paired_difference(runs, "other", "base", k=k)
            if difference is None:
                raise SystemExit(f"error: {other} and {base} share no finished seed")
            mean, low, high, by_seed = difference
            cells.append(f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
            per_seed = per_seed or by_seed  # top-1's
        seeds = ", ".join(f"{seed}: {100 * value:+.1f}" for seed, value in per_seed.items())
        label = f"{other.parent.name}/{other.name}" if other.name.startswith("views.json") else other.name
        lines.append(f"| {label} | {', '.join(map(str, per_seed))} | {cells[0]} | {cells[1]} | {seeds} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="the folder every other is compared with")
    parser.add_argument("others", type=Path, nargs="+", metavar="other")
    parser.add_argument("--variant", default="robust_multitask_products", help="the variant compared (default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"Paired differences against {args.base} (percentage points; 95 % interval resampling seeds and queries):\n")
    print("| folder | seeds | top-1 − base | top-5 − base | top-1 − base, each seed |")
    print("|---|---|---|---|---|")
    for line in rows(args.base, args.others, args.variant):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
