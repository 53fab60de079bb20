"""Pins of what pip resolved, for the image: ``name==version`` per line, TensorFlow as the build chose.

Reads the report of ``pip install --dry-run --report FILE '.[service]'`` and prints every
distribution it would install except the project itself, with ``tensorflow`` replaced by
``--tensorflow`` at the same version (``tensorflow-cpu``: the same TensorFlow without the
CUDA kernels, about 0.6 GB less). The image installs the pins with ``--no-deps``, so
nothing else is resolved behind this list's back.

    python deploy/pin_requirements.py report.json --tensorflow tensorflow-cpu --skip street2shop > pins.txt
"""

from __future__ import annotations

import argparse
import json
import re
import sys


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(report: dict, tensorflow: str, skip: set[str]) -> list[str]:
    lines = []
    for item in report["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if canonical(name) in skip:
            continue
        lines.append(f"{tensorflow if canonical(name) == 'tensorflow' else name}=={version}")
    if not any(line.startswith(f"{tensorflow}==") for line in lines):
        raise SystemExit(f"pin_requirements: tensorflow is not among the resolved distributions. Received: {lines}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="pip's --report JSON")
    parser.add_argument("--tensorflow", default="tensorflow-cpu", help="the TensorFlow distribution to install (tensorflow for GPU kernels)")
    parser.add_argument("--skip", action="append", default=[], help="a distribution not to pin (installed on its own)")
    args = parser.parse_args(argv)
    with open(args.report, encoding="utf-8") as f:
        report = json.load(f)
    print("\n".join(pins(report, args.tensorflow, {canonical(s) for s in args.skip})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
