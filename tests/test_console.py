"""What a person's terminal shows: progress as a bar, as log lines or not at all, and no TensorFlow start-up lines."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from street2shop.console import Progress, is_start_up_line, progress_mode

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert progress_mode("auto", Terminal()) == "bar"
    assert progress_mode(True, io.StringIO()) == "lines"
    assert progress_mode(False, Terminal()) == "none"
    with pytest.raises(ValueError, match="one of"):
        progress_mode("loud")


def test_the_bar_is_redrawn_in_place_without_colour_codes():
    screen, clock = Terminal(), Clock()
    bar = Progress(10, "embedding", unit="images", stream=screen, clock=clock)
    for done in range(1, 11):
        clock.now += 1.0
        bar.update(done, "loss 0.5")
    bar.close()
    text = screen.getvalue()
    assert not ANSI.search(text)
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn with \r
    last = text.rstrip("\n").rsplit("\r", 1)[1]
    assert last.startswith("[" + "#" * Progress.WIDTH + "]")
    assert "embedding: 10/10 images, 10 s; loss 0.5" in last
    # halfway: half the bar and the time left at the pace so far (5 s for 5 images -> 5 s more)
    halfway = [part for part in text.split("\r") if "5/10" in part][0]
    assert halfway.startswith("[" + "#" * (Progress.WIDTH // 2) + "." * (Progress.WIDTH // 2) + "]")
    assert "about 5 s to go" in halfway


def test_log_files_get_a_plain_line_every_30_seconds(caplog):
    stream, clock = io.StringIO(), Clock()
    with caplog.at_level(logging.INFO, logger="street2shop.console"):
        bar = Progress(100, "embedding", unit="images", stream=stream, clock=clock, every=30)
        for done in range(1, 101):
            clock.now += 1.0  # 100 s in all
            bar.update(done)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert stream.getvalue() == ""  # nothing drawn
    assert lines == ["embedding: 30/100 images, 30 s, about 1:10 to go", "embedding: 60/100 images, 1:00, about 40 s to go",
                     "embedding: 90/100 images, 1:30, about 10 s to go", "embedding: 100/100 images, 1:40"]
    assert not any(ANSI.search(line) or "\r" in line for line in lines)


def test_a_resumed_run_estimates_from_its_own_pace(caplog):
    # 60 of 100 done before; this run does 1 image a second. After 20 s: 80 done, 20 to go at 1/s = 20 s
    # (counting the 60 as done in those 20 s would say 20 / 4 per s = 5 s).
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="street2shop.console"):
        bar = Progress(100, "embedding", unit="images", mode="lines", every=20, done=60, stream=io.StringIO(), clock=clock)
        for done in range(61, 81):
            clock.now += 1.0
            bar.update(done)
    assert [r.getMessage() for r in caplog.records] == ["embedding: 80/100 images, 20 s, about 20 s to go"]


def test_short_work_in_a_log_file_none_mode_and_erase_say_nothing_more(caplog):
    stream, clock = Terminal(), Clock()
    with caplog.at_level(logging.INFO, logger="street2shop.console"):
        quick = Progress(3, "embedding", mode="lines", stream=stream, clock=clock)
        quick.update(3)
        quick.close()
        off = Progress(3, "embedding", mode="none", stream=stream, clock=clock)
        off.update(3)
        off.close()
        told = Progress(3, "epoch 1/2", mode="lines", stream=stream, clock=clock, every=30)
        clock.now += 31
        told.update(3)  # a line: 30 s have passed
        told.close(erase=True)  # the caller says the outcome itself: no last line
    assert [r.getMessage() for r in caplog.records] == ["epoch 1/2: 3/3, 31 s"] and stream.getvalue() == ""


# Lines TensorFlow 2.21 writes as it starts on a machine without a GPU (copied from a real run).
START_UP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796048849.140954    9858 port.cc:153] oneDNN custom operations are on. You may see slightly different "
    "numerical results due to floating-point round-off errors from different computation orders. To turn them off, set "
    "the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1796048849.141269    9858 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.",
    "I0000 00:00:1796048849.232919    9858 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available "
    "CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
]
CUINIT = "E0000 00:00:1796048854.561885    9858 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"


def test_start_up_lines_are_recognised_and_errors_are_not():
    assert all(is_start_up_line(line + "\n") for line in START_UP)
    assert is_start_up_line(CUINIT, gpu_driver=False)
    assert not is_start_up_line(CUINIT, gpu_driver=True)  # with a GPU driver, a failing cuInit is news
    other_error = "E0000 00:00:1796048854.561885    9858 op_kernel.cc:1840] OP_REQUIRES failed: out of memory"
    for line in (other_error, "street2shop: error: manifest not found", "UserWarning: something", ""):
        assert not is_start_up_line(line, gpu_driver=False)


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP_", "CUDA_"))}  # as a user's shell
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "street2shop", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia"), reason="the CUDA probe's error is kept where there is a GPU driver")
def test_a_command_that_imports_tensorflow_prints_only_its_own_lines(synth_dataset, tmp_path):
    # `data check` decodes every image with TensorFlow's decoder, so it imports TensorFlow and runs ops.
    quiet = _run(["data", "check", str(synth_dataset)], tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "images" in quiet.stdout
    noise = [line for line in quiet.stderr.splitlines() if re.search(r"absl|oneDNN|cuInit|cuda|cpu_feature|^[IWE]\d{4} ", line)]
    assert noise == [], quiet.stderr
    # Asked for (-vv), they are there: the filter has something to filter.
    loud = _run(["data", "check", str(synth_dataset), "-vv"], tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert any(is_start_up_line(line, gpu_driver=False) for line in loud.stderr.splitlines()), loud.stderr
    print(f"stderr lines: {len(quiet.stderr.splitlines())} quiet, {len(loud.stderr.splitlines())} with -vv")
