"""What a person's terminal shows: progress, and TensorFlow's start-up lines kept off it.

- :class:`Progress`: how far a long piece of work is. A bar redrawn in place
  on a terminal (plain characters, no colour codes), a plain log line at most
  every ``every`` seconds elsewhere (a log file, a CI log), or nothing
  (``--json``). ``mode="auto"`` picks the bar when stderr is a terminal.
- :func:`quiet_tensorflow`: keeps TensorFlow's C++ start-up lines (absl's
  "All log messages before absl::InitializeLog()", oneDNN, CUDA probes, CPU
  features) off stderr; the CLI calls it before any command runs, unless
  ``-vv``. It imports no TensorFlow itself: TensorFlow is still imported only
  by what needs it, and the first such import is the filtered one.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

logger = logging.getLogger(__name__)

MODES = ("auto", "bar", "lines", "none")


def progress_mode(mode: str | bool = "auto", stream: TextIO | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"none"``: ``"auto"`` (or True) is a bar on a terminal, log lines elsewhere; False is none."""
    if mode is True:
        mode = "auto"
    elif mode is False:
        mode = "none"
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {MODES}. Received: mode={mode!r}")
    if mode != "auto":
        return mode
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "lines"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Progress:
    """Work done out of ``total``: a bar on a terminal, a log line every ``every`` seconds elsewhere, or nothing.

    Args:
        total: int. Units of work in all.
        what: str. What is being done (``"embedding"``, ``"epoch 2/6"``).
        unit: str. The unit's name, plural (``"images"``, ``"steps"``).
        mode: ``"auto"``, ``"bar"``, ``"lines"`` or ``"none"`` (True / False: auto / none).
        every: float. Lines mode: seconds between two lines.
        done: int. Work already done before this run (a resumed one): shown,
            but the time to go is estimated from this run's own pace.
        stream: where the bar is drawn (stderr by default).
        clock: a monotonic clock in seconds (tests pass their own).

    Example:
        >>> bar = Progress(270, "embedding", unit="images", mode="none")
        >>> bar.add(32)
        >>> bar.close()
    """

    WIDTH = 24

    def __init__(self, total: int, what: str, *, unit: str = "", mode: str | bool = "auto", every: float = 30.0,
                 done: int = 0, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.mode = progress_mode(mode, self.stream)
        self.total = max(0, int(total))
        self.what = what
        self.unit = unit
        self.every = float(every)
        self.clock = clock
        self.start = clock()
        self.done = self.already = max(0, int(done))
        self.lines = 0  # lines logged in lines mode
        self.info = ""  # the last update's text
        self._last = self.start
        self._drawn = 0  # width of the bar on screen
        self._closed = False

    def _text(self, info: str) -> str:
        elapsed = self.clock() - self.start
        text = f"{self.what}: {self.done}/{self.total}" + (f" {self.unit}" if self.unit else "") + f", {_duration(elapsed)}"
        if self.already < self.done < self.total:
            text += f", about {_duration(elapsed / (self.done - self.already) * (self.total - self.done))} to go"
        return text + (f"; {info}" if info else "")

    def _draw(self, info: str) -> None:
        filled = self.WIDTH * min(self.done, self.total) // self.total if self.total else self.WIDTH
        bar = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] "
        text = bar + self._text(info)
        self.stream.write("\r" + text + " " * max(0, self._drawn - len(text)))
        self.stream.flush()
        self._drawn = len(text)

    def update(self, done: int, info: str = "") -> None:
        """Sets the work done to ``done``; ``info`` is a short text shown beside it (``"loss 0.512"``)."""
        self.done = int(done)
        self.info = info
        if self.mode == "none" or self._closed:
            return
        now = self.clock()
        if self.mode == "bar":
            if now - self._last >= 0.1 or self.done >= self.total:
                self._draw(info)
                self._last = now
        elif now - self._last >= self.every:
            logger.info("%s", self._text(info))
            self.lines += 1
            self._last = now

    def add(self, n: int, info: str = "") -> None:
        """Adds ``n`` units of work done."""
        self.update(self.done + n, info)

    def close(self, info: str = "", *, erase: bool = False) -> None:
        """Ends the bar (on its own line, or erased when ``erase``); in lines mode, a last line if any was logged.

        ``erase`` is for a caller that says the outcome itself: no last bar, no last line.
        ``info`` defaults to the last update's.
        """
        if self._closed:
            return
        self._closed = True
        info = info or self.info
        if self.mode == "bar" and self._drawn:
            if erase:
                self.stream.write("\r" + " " * self._drawn + "\r")
            else:
                self._draw(info)
                self.stream.write("\n")
            self.stream.flush()
        elif self.mode == "lines" and self.lines and not erase:
            logger.info("%s", self._text(info))


# --------------------------------------------------------------------------- TensorFlow's start-up lines

# What TensorFlow's C++ side writes while it starts: absl's notice that logging is not set up yet, then
# INFO and WARNING lines (oneDNN, "Could not find cuda drivers", CPU features and their continuation line).
_START_UP_LINE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.\-]+:\d+\] .*"
    r"|To enable the following instructions: .*"
)
# Without an NVIDIA driver, the CUDA probe's error says only that there is no GPU.
_NO_GPU_LINE = re.compile(r"E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.\-]+:\d+\] failed call to cuInit: .*")


def is_start_up_line(line: str, *, gpu_driver: bool | None = None) -> bool:
    """Whether ``line`` is one of TensorFlow's start-up lines (the CUDA probe's error counts only without a GPU driver)."""
    line = line.rstrip("\r\n")
    if _START_UP_LINE.fullmatch(line):
        return True
    if gpu_driver is None:
        gpu_driver = os.path.exists("/proc/driver/nvidia")
    return not gpu_driver and bool(_NO_GPU_LINE.fullmatch(line))


@contextlib.contextmanager
def stderr_filtered(drop: Callable[[str], bool] = is_start_up_line) -> Iterator[None]:
    """File descriptor 2 goes to a temporary file meanwhile; afterwards, its lines but those ``drop`` matches go to stderr.

    At the descriptor level, so it catches what C++ code writes. Writes of
    other threads meanwhile are held back until the end, not lost.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, AttributeError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True) if not drop(line)]
            if kept:
                os.write(2, "".join(kept).encode("utf-8", "replace"))


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports TensorFlow, the first time anything imports it, with its start-up lines filtered out of stderr.

    It also lists the devices then (the CUDA probe, which would otherwise log
    at the first operation). The import machinery then gets the module already
    made: ``create_module`` returns it and ``exec_module`` only gives it its
    own ``__spec__`` back.
    """

    def __init__(self) -> None:
        self.module: Any = None
        self.spec: Any = None

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        uninstall_quiet_tensorflow()
        with stderr_filtered():
            self.module = importlib.import_module(name)
            self.module.config.list_physical_devices()
        self.spec = self.module.__spec__
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: Any) -> Any:
        return self.module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self.spec  # module_from_spec set ours


def quiet_tensorflow() -> None:
    """Keeps TensorFlow's C++ start-up lines off stderr; real errors and Python warnings still show.

    Sets ``TF_CPP_MIN_LOG_LEVEL=2`` (unless set: INFO and WARNING of TF's C++
    logging once it is set up) and filters the lines written before that
    setting applies, when TensorFlow is first imported. Undo with
    :func:`uninstall_quiet_tensorflow` (the setting stays).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietTensorFlowImport())


def uninstall_quiet_tensorflow() -> None:
    """Removes the import hook of :func:`quiet_tensorflow` if it has not been used."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowImport)]
