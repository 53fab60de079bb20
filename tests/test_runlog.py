"""Reading a training run's log.csv (trimming it for a resumed run: tests/test_train_runs.py)."""

import pytest

from street2shop.errors import DataError
from street2shop.runlog import best_logged_epoch, read_run_log, run_history, run_log_columns


def test_rows_are_numbers_and_a_missing_value_is_none(tmp_path):
    # As Keras' CSVLogger writes a run without validation in its first epoch: NA where there is no value.
    log = tmp_path / "log.csv"
    log.write_text("epoch,learning_rate,loss,val_loss\n0,0.001,0.9,NA\n1,0.0005,0.7,0.6\n")
    assert read_run_log(log) == [{"epoch": 0, "learning_rate": 0.001, "loss": 0.9, "val_loss": None},
                                 {"epoch": 1, "learning_rate": 0.0005, "loss": 0.7, "val_loss": 0.6}]
    assert run_history(log) == {"learning_rate": [0.001, 0.0005], "loss": [0.9, 0.7], "val_loss": [None, 0.6]}
    assert run_history(log, validation=False) == {"learning_rate": [0.001, 0.0005], "loss": [0.9, 0.7]}
    assert run_log_columns(log) == ["epoch", "learning_rate", "loss", "val_loss"]
    assert best_logged_epoch(log, "val_loss") == (1, 0.6)  # the NA of epoch 0 is no value, not an error


def test_a_missing_or_malformed_log_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot read the run log .*absent.csv"):
        read_run_log(tmp_path / "absent.csv")
    assert run_log_columns(tmp_path / "absent.csv") is None
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss\n0,0.9\n1,lots\n")
    with pytest.raises(DataError, match="log.csv line 3"):
        read_run_log(log)
    assert best_logged_epoch(log, "loss") is None
