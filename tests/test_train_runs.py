"""A training run's life: resuming after an interruption, Ctrl-C at an epoch's end, its log and the lines it shows.

(Apart from tests/test_train.py so that the two test workers share the training runs.)
"""

import csv
import logging
import re

import keras
import numpy as np
import pytest

from street2shop.compile import build_model
from street2shop.errors import ConfigError
from street2shop.model.siamese import load_tower_weights, tower_of
from street2shop.train import train
from tests.test_train import tiny_config


class Interrupt(keras.callbacks.Callback):
    """Kills the run at the end of an epoch, after BackupAndRestore wrote its backup."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_at_the_next_epoch(synth_dataset, tmp_path, caplog):
    # With a robust-loss warm-up of one epoch: epoch 1 drops nothing, and the resumed run
    # (epochs 2 and 3) knows that its warm-up is over. With a cosine schedule after one warm-up
    # epoch, the resumed run continues the schedule where it stopped. Under mixed_bfloat16: the run
    # resumes under its own dtype policy, and another is refused before anything in its folder changes.
    config = tiny_config(synth_dataset, tmp_path / "run", epochs=3, positive_quantile=0.5, drop_warmup_epochs=1,
                         lr_schedule="cosine", warmup_epochs=1.0, precision="mixed_bfloat16")
    with pytest.raises(KeyboardInterrupt):
        train(config, extra_callbacks=[Interrupt(epoch=0)], verbose=0)
    folder = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ConfigError) as refused:
        train(config.replace(precision="float32"), verbose=0)
    message = str(refused.value)
    assert "\n" not in message and "under precision 'mixed_bfloat16'" in message and "Received: precision='float32'" in message
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == folder
    with caplog.at_level(logging.INFO, logger="street2shop"):
        result = train(config, verbose=0)
    progress = [r for r in caplog.records if r.name == "street2shop.callbacks" and r.getMessage().startswith(("epoch ", "the first step", "graph built"))]
    assert not progress  # verbose=0: no progress lines (the warm-up's own message is not progress)
    assert result.initial_epoch == 1
    assert len(result.history["loss"]) == 2  # epochs 2 and 3 only
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    assert float(rows[0]["positive_drop_rate"]) == 0.0
    # The rate of the next step at each epoch's end, by hand: the peak after the warm-up epoch, then
    # peak·(1 + cos(π·t))/2 at t = 1/2 and t = 1 of the two cosine epochs.
    peak = config.fit.learning_rate
    assert [float(row["learning_rate"]) for row in rows] == pytest.approx([peak, peak / 2, 0.0], abs=1e-9)
    # q = 0.5 drops about half the positives of every batch once the warm-up is over
    assert all(rate > 0.0 for rate in result.history["positive_drop_rate"])
    # What the refusal offers instead: a float32 run from its weights (init_checkpoint), which are float32 in every policy.
    float32_model = build_model(config.replace(precision="float32"), None)
    load_tower_weights(float32_model, tmp_path / "run" / "last.keras")
    for mine, theirs in zip(tower_of(float32_model).weights, tower_of(result.model).weights):
        assert mine.dtype == theirs.dtype == "float32"
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


class Weights(keras.callbacks.Callback):
    """Records the model's trainable weights after every training step, at the start of every validation, and at
    every epoch's end (as extra callbacks, after the run's own: after its records and its backup)."""

    def __init__(self):
        super().__init__()
        self.steps, self.validated, self.epoch_ends = [], [], []

    def _now(self):
        return [v.numpy().copy() for v in self.model.trainable_variables]

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(self._now())

    def on_test_begin(self, logs=None):
        self.validated.append(self._now())

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_ends.append(self._now())


def test_a_moving_average_of_the_weights_is_validated_recorded_resumed_and_kept(synth_dataset, tmp_path):
    # ema_momentum m: after the first applied step the average is the weights; after each next one
    # m·average + (1 − m)·weights (Keras' use_ema). Computed here by hand from the weights recorded after
    # every step, across an interruption: the backup must hold the trained weights and the average as
    # training left them, or the resumed run's average (and its weights) go wrong.
    m = 0.5
    config = tiny_config(synth_dataset, tmp_path / "run", epochs=3, ema_momentum=m)  # 2 steps per epoch
    first, second = Weights(), Weights()
    with pytest.raises(KeyboardInterrupt):
        train(config, extra_callbacks=[first, Interrupt(epoch=0)], verbose=0)
    with pytest.raises(ConfigError) as refused:  # another moving average (none) is refused
        train(config.replace(ema_momentum=0.0), verbose=0)
    assert "\n" not in str(refused.value) and "ema_momentum 0.5" in str(refused.value) and "Received: ema_momentum=0.0" in str(refused.value)
    result = train(config, extra_callbacks=[second], verbose=0)
    assert result.initial_epoch == 1
    steps = first.steps + second.steps
    assert len(steps) == 6
    averages, average = [], None
    for weights in steps:
        average = weights if average is None else [m * a + (1 - m) * w for a, w in zip(average, weights)]
        averages.append(average)

    def close(got, expected):
        return all(np.allclose(g, e, rtol=1e-5, atol=1e-6) for g, e in zip(got, expected))

    # The trained weights move on from the backup: the resumed run's first step starts from epoch 1's last weights.
    assert not close(steps[-1], averages[-1])  # the average is not the last weights (else this test could not fail)
    # Validation sees the average of the steps so far; after the epoch's records and the backup, training has
    # its own weights back.
    validated = first.validated + second.validated
    epoch_ends = first.epoch_ends + second.epoch_ends
    for epoch in range(3):
        assert close(validated[epoch], averages[2 * epoch + 1]), epoch
        assert close(epoch_ends[epoch], steps[2 * epoch + 1]), epoch
    # The model fit returns, last.keras and the tower an export would take hold the final average.
    assert close([v.numpy() for v in result.model.trainable_variables], averages[-1])
    last = keras.saving.load_model(tmp_path / "run" / "last.keras", compile=False)
    assert close([v.numpy() for v in last.trainable_variables], averages[-1])
    best = keras.saving.load_model(tmp_path / "run" / "best.keras", compile=False)
    assert any(close([v.numpy() for v in best.trainable_variables], averages[2 * e + 1]) for e in range(3))


def test_ctrl_c_while_an_epoch_is_being_saved_loses_no_log_row(synth_dataset, tmp_path, monkeypatch):
    # Ctrl-C lands while epoch 2's checkpoints are written (the slow part: 264 MB each at 75 px). Before,
    # the backup had already marked epoch 2 done and the log row was not written yet: log.csv held epochs
    # 0 and 2. Now the run redoes epoch 2, and its log holds every epoch once.
    config = tiny_config(synth_dataset, tmp_path / "run", epochs=3)
    save = keras.callbacks.ModelCheckpoint.on_epoch_end

    def interrupted_save(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt
        return save(self, epoch, logs)

    monkeypatch.setattr(keras.callbacks.ModelCheckpoint, "on_epoch_end", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train(config, verbose=0)
    monkeypatch.undo()
    result = train(config, verbose=0)
    assert result.initial_epoch == 1  # epoch 2 again: it was not finished
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    assert float(rows[1]["loss"]) == pytest.approx(result.history["loss"][0])  # the row of the epoch that finished


def test_a_run_resumed_from_before_the_learning_rate_column_keeps_its_log_header(synth_dataset, tmp_path):
    # CSVLogger appends under the old header: a new column would shift every later value under the wrong name.
    from street2shop.callbacks import LearningRateLog
    from street2shop.callbacks import build_callbacks
    from street2shop.compile import build_model

    config = tiny_config(synth_dataset, tmp_path / "run")
    model = build_model(config, None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.csv").write_text("epoch,loss,pair_accuracy\n0,0.9,0.5\n")

    def has_rate_log(initial_epoch):
        return any(isinstance(c, LearningRateLog) for c in build_callbacks(config, model, tmp_path / "run", initial_epoch, "loss"))

    assert not has_rate_log(1)
    assert has_rate_log(0)  # a new run writes a new log
    (tmp_path / "run" / "log.csv").write_text("epoch,learning_rate,loss\n0,0.001,0.9\n")
    assert has_rate_log(1)


def test_trim_log_keeps_the_rows_before_the_resumed_epoch(tmp_path):
    from street2shop.runlog import trim_run_log

    log = tmp_path / "log.csv"
    log.write_text("epoch,loss\n0,0.9\n1,0.8\n2,0.7\n3,0.")  # the last row cut off mid-write
    trim_run_log(log, 2)
    assert log.read_text() == "epoch,loss\n0,0.9\n1,0.8\n"
    trim_run_log(tmp_path / "absent.csv", 1)  # nothing to trim


def test_training_shows_a_short_line_per_epoch(synth_dataset, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="street2shop"):
        train(tiny_config(synth_dataset, tmp_path / "lines", epochs=2), verbose=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "street2shop.callbacks"]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(" (")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"], lines
    for line in epochs:
        assert re.fullmatch(r"epoch \d/2 \(\d+ s\): loss [\d.]+ \(val [\d.]+\), pair accuracy \d+% \(val \d+%\).*", line), line
        assert len(line) < 200 and "\x1b" not in line
    assert any("first step" in line for line in lines)
    # verbose=0 shows nothing: checked in test_interrupted_run_resumes_at_the_next_epoch (a run it trains anyway)


def test_epoch_summary_by_hand():
    from street2shop.callbacks import epoch_summary

    logs = {"loss": 0.5124, "val_loss": 0.4981, "distance_pair_accuracy": 0.714, "val_distance_pair_accuracy": 0.69,
            "logits_a_accuracy": 0.351, "logits_a_loss": 2.0, "distance_positive_drop_rate": 0.1, "distance_mean_positive_distance": 0.3}
    assert epoch_summary(logs) == ("loss 0.512 (val 0.498), pair accuracy 71% (val 69%), class accuracy 35%, "
                                   "positives dropped 10%")


def test_best_logged_value_of_a_resumed_run_skips_the_warmup_epochs(tmp_path):
    from street2shop.runlog import best_logged_epoch

    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,val_loss\n0,0.9,0.8\n1,0.7,0.6\n2,0.5,0.65\n3,0.4,0.7\n")
    assert best_logged_epoch(log, "val_loss") == (1, 0.6)
    assert best_logged_epoch(log, "val_loss", from_epoch=2) == (2, 0.65)
    assert best_logged_epoch(log, "loss", from_epoch=2) == (3, 0.4)
    assert best_logged_epoch(tmp_path / "missing.csv", "val_loss") is None


def test_best_checkpoint_comes_from_after_a_robust_warmup_that_ends_within_the_run(tmp_path):
    from street2shop.callbacks import best_checkpoint_from_epoch

    def first(**kw):
        return best_checkpoint_from_epoch(tiny_config("m.csv", tmp_path, epochs=5, **kw))

    assert first(drop_warmup_epochs=2) == 2
    assert first(drop_warmup_epochs=0) == 0
    assert first(drop_warmup_epochs=5) == 0  # the warm-up never ends: every epoch is plain, all compete
    assert first(drop_warmup_epochs=2, loss="contrastive") == 0  # no drop, no warm-up


def test_best_logged_epoch_is_the_first_of_the_lowest(tmp_path):
    from street2shop.runlog import best_logged_epoch

    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,val_loss\n0,0.9,0.7\n1,0.8,0.6\n2,0.5,0.6\n3,0.4,0.65\n")
    assert best_logged_epoch(log, "val_loss") == (1, 0.6)  # epochs 1 and 2 tie: the first, as ModelCheckpoint keeps it
    assert best_logged_epoch(log, "val_loss", from_epoch=2) == (2, 0.6)
    assert best_logged_epoch(log, "loss") == (3, 0.4)
    assert best_logged_epoch(log, "accuracy") is None
