"""The README's tour, run as it stands there: its shell blocks in one bash, then its Python block.

The commands are read from README.md when the test runs (the ```sh blocks of
"## A short tour" before its first "###" heading, and the ```python block of
"### From Python"), never copied here, so the README cannot drift from the
code. Three adaptations, for running unattended beside other tests: the port
8500 becomes a free one; after a command sent to the background (the
stand-in server) the script waits until its port answers, as a reader waits
for its "started on" line; and ``street2shop`` on the PATH is a shim running
this checkout's code with the test's Python. The tour's own ``kill %1`` stops
the server; its process group is killed at the end whatever happened.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HANG_GUARD_SECONDS = 40 * 60  # only against a hang: the tour takes about a minute (2 on 2 busy cores); a hang fails with its log
# TensorFlow's C++ start-up lines, by their look (not by the filter under test, street2shop.console).
START_UP_LINE = re.compile(r"absl|oneDNN|cuInit|cuda|cpu_feature|^[IWE]\d{4} ")


def section(text: str, heading: str) -> str:
    """The lines under ``heading`` up to the next heading of the same or a higher level (outside code blocks)."""
    level = len(heading.split(" ", 1)[0])
    lines = text.splitlines(keepends=True)
    start = lines.index(heading + "\n") + 1
    fenced = False
    for end in range(start, len(lines)):
        line = lines[end]
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,%d} " % level, line):
            return "".join(lines[start:end])
    return "".join(lines[start:])


def blocks(text: str, language: str) -> list[str]:
    return re.findall(r"^```%s\n(.*?)^```$" % language, text, flags=re.S | re.M)


def tour_blocks(readme: str) -> tuple[list[str], str]:
    tour = section(readme, "## A short tour")
    shell = blocks(tour.split("\n### ", 1)[0], "sh")
    python = blocks(section(tour, "### From Python"), "python")
    assert len(shell) >= 4 and len(python) == 1, "the tour's blocks were not found where this test looks for them"
    return shell, python[0]


def script_of(shell: list[str], port: int) -> str:
    lines = ["set -euo pipefail",
             # Waits for the last background command's port; fails if that command exits first.
             'wait_for_port() { local pid=$!; until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do '
             'kill -0 "$pid" 2>/dev/null || { echo "the background command exited" >&2; return 1; }; sleep 1; done; }']
    for block in shell:
        for line in block.replace("8500", str(port)).splitlines():
            lines.append(line)
            if line.rstrip().endswith("&"):
                port_flag = re.search(r"--port (\d+)", line)
                assert port_flag, f"a background command without --port: {line}"
                lines.append(f"wait_for_port {port_flag.group(1)}")
    return "\n".join(lines) + "\n"


def test_the_tour_blocks_are_found_and_adapted_as_documented():
    shell, python = tour_blocks(README.read_text())
    script = script_of(shell, 12345)
    assert "street2shop serve tour/exports --port 12345 &\nwait_for_port 12345\n" in script
    assert "--server localhost:12345" in script and "8500" not in script
    assert "kill %1" in script and "import-street2shop" not in script  # the real-data section is not run
    assert "from street2shop" in python


@pytest.mark.slow(minutes=2)  # among the longest tests: scheduled first (conftest.py)
def test_the_readme_tour_runs_as_written(tmp_path):
    shell, _ = tour_blocks(README.read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "street2shop"  # the console script, running this checkout's code
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m street2shop "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP_", "CUDA_"))}  # as a user's shell
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT))
    work = tmp_path / "clone"
    work.mkdir()
    (work / "tour.sh").write_text(script_of(shell, free_port()))
    log = tmp_path / "tour.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "tour.sh"], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(HANG_GUARD_SECONDS)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the stand-in, if the tour did not get to stop it
                except ProcessLookupError:
                    pass
        text = log.read_text()
        assert code == 0, f"exit code {code} (None: still running after {HANG_GUARD_SECONDS} s)\n" + text[-6000:]
        check_the_tour(work, text, env)
    finally:
        shutil.rmtree(work / "tour", ignore_errors=True)  # checkpoints and exports (11 MB; 1.4 GB with InceptionV3); the log is kept


def check_the_tour(work: Path, text: str, env: dict[str, str]) -> None:
    """What the reader is promised along the way, then the Python block, run after the shell ones in the same folder."""
    assert re.search(r"epoch 2/2 \(\d+ s\): loss ", text), text[-3000:]
    with open(work / "tour" / "run" / "log.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [0, 1]
    assert re.search(r"^ +1\. p\d{3} +[-\d.]+ ", text, flags=re.M) and re.search(r"^ +5\. p\d{3} ", text, flags=re.M)
    with open(work / "tour" / "data" / "manifest.csv") as f:
        val_queries = sum(row["domain"] == "street" and row["split"] == "val" for row in csv.DictReader(f))
    assert val_queries > 0 and re.search(rf"top-1 [\d.]+% .*\({val_queries} queries, whole catalogue\)", text), text[-3000:]
    report = json.loads((work / "tour" / "report" / "report.json").read_text())
    assert report["runs"]["model"]["searched"] == "the whole catalogue"
    assert (work / "tour" / "report" / "examples.html").stat().st_size > 10_000
    assert not [line for line in text.splitlines() if START_UP_LINE.search(line)], "TensorFlow's start-up lines"

    _, python = tour_blocks(README.read_text())
    (work / "tour.py").write_text(python)
    done = subprocess.run([sys.executable, "tour.py"], cwd=work, env=env, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert done.returncode == 0, done.stderr[-6000:]
    hits = [line.split() for line in done.stdout.splitlines()]
    assert [int(h[0]) for h in hits] == [1, 2, 3, 4, 5] and all(re.fullmatch(r"p\d{3}", h[1]) for h in hits), done.stdout
    similarities = [float(h[2]) for h in hits]
    assert similarities == sorted(similarities, reverse=True)
    assert (work / "tour" / "exports" / "2").is_dir() and (work / "tour" / "index" / "2").is_dir()
