"""The training run's log, ``log.csv`` in its output folder: one row per finished epoch.

Keras' ``CSVLogger`` writes it (``callbacks.build_callbacks`` places it): an
``epoch`` column (0-based), then every logged value in alphabetical order
(``loss``, each metric, ``learning_rate``, their ``val_`` twins; ``NA`` where an
epoch has none). This module reads it: :func:`read_run_log` (every row),
:func:`run_history` (a column per metric), :func:`best_logged_epoch`; and
keeps it whole for a resumed run: :func:`trim_run_log` drops the rows of the
epochs it does again.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from street2shop.errors import DataError
from street2shop.fileio import write_atomic

logger = logging.getLogger(__name__)

LOG_FILE = "log.csv"


def read_run_log(log_csv: str | os.PathLike[str]) -> list[dict[str, float | None]]:
    """Every row of a run's ``log.csv``: ``{"epoch": e, column: value}`` (``e`` an int, 0-based; values as floats, None where the epoch has none).

    Raises:
        DataError: there is no such file, or a value is not a number (the message names the line).
    """
    rows: list[dict[str, float | None]] = []
    try:
        with open(log_csv, newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                try:
                    values = {key: _number(value) for key, value in row.items() if key is not None}
                    epoch = values.get("epoch")
                    if epoch is not None:
                        values["epoch"] = int(epoch)
                    rows.append(values)
                except ValueError as e:
                    raise DataError(f"{log_csv} line {reader.line_num}: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read the run log {log_csv}: {e.strerror or e}") from None
    return rows


def _number(value: str | None) -> float | None:
    if value is None or value in ("", "NA"):
        return None
    return float(value)


def run_history(log_csv: str | os.PathLike[str], *, validation: bool = True) -> dict[str, list[float | None]]:
    """A run's log as ``{column: [value of each epoch]}`` (without ``epoch``; without the ``val_`` columns unless ``validation``)."""
    rows = read_run_log(log_csv)
    columns = [key for key in (rows[0] if rows else {}) if key != "epoch" and (validation or not key.startswith("val_"))]
    return {key: [row.get(key) for row in rows] for key in columns}


def run_log_columns(log_csv: str | os.PathLike[str]) -> list[str] | None:
    """The header of a run's log (None without a log, or an empty one)."""
    try:
        with open(log_csv, newline="") as f:
            return next(csv.reader(f), None)
    except OSError:
        return None


def best_logged_epoch(log_csv: str | os.PathLike[str], monitor: str, from_epoch: int = 0) -> tuple[int, float] | None:
    """``(epoch, value)``: the epoch (0-based) of the lowest ``monitor`` value in a run's log, from ``from_epoch`` on.

    None without such a value (no log, no such column). The first of equal values wins, as in ``ModelCheckpoint``.
    """
    try:
        rows = read_run_log(log_csv)
    except DataError:
        return None
    best: tuple[int, float] | None = None
    for row in rows:
        epoch, value = row.get("epoch") or 0, row.get(monitor)
        if value is not None and epoch >= from_epoch and (best is None or value < best[1]):
            best = (epoch, value)
    return best


def trim_run_log(log_csv: str | os.PathLike[str], initial_epoch: int) -> None:
    """Keeps the rows of epochs before ``initial_epoch`` (0-based), and drops the rest: a resumed run writes them again.

    A row cut off mid-write (no line end) goes too.
    """
    log_csv = Path(log_csv)
    try:
        text = log_csv.read_text()
    except FileNotFoundError:
        return
    lines = text.splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]]
    for line in lines[1:]:
        row = next(csv.reader(io.StringIO(line)), [])
        if line.endswith("\n") and row and row[0].isdigit() and int(row[0]) < initial_epoch:
            kept.append(line)
    if len(kept) < len(lines):
        logger.info("%s: dropping %d row(s) of epochs the resumed run does again", log_csv, len(lines) - len(kept))
        write_atomic(log_csv, "".join(kept))
