"""Training on several workers: the pair plans dealt to input pipelines, who writes where, and real worker processes.

The slow tests start two ``MultiWorkerMirroredStrategy`` workers on loopback,
each a process with its own ``TF_CONFIG`` (ports picked free), as the README's
cluster recipe does.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from street2shop.callbacks import RestoreFromChief
from street2shop.cluster import WorkerRole, loopback_tf_configs, strategy_kind, worker_role, worker_write_dir
from street2shop.config import TrainConfig, save_config
from street2shop.data.pairs import PairPlan
from street2shop.errors import ConfigError
from street2shop.export import load_checkpoint
from street2shop.train import _warn_if_the_quantile_cannot_drop
from street2shop.training_data import TrainingData, build_datasets, load_training_data
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def numbered_plan(rows):
    """A plan whose row r has label r (so a row is recognisable after sharding)."""
    return PairPlan(
        path_a=np.array([f"a{r}" for r in range(rows)], dtype=object), box_a=np.zeros((rows, 4), np.float32),
        path_b=np.array([f"b{r}" for r in range(rows)], dtype=object), box_b=np.zeros((rows, 4), np.float32),
        label=np.arange(rows, dtype=np.float32), class_a=np.full(rows, -1, np.int32), class_b=np.full(rows, -1, np.int32),
        kind=np.zeros(rows, np.int32), street_a=np.ones(rows, bool), street_b=np.zeros(rows, bool),
    )


def test_plan_shards_deal_runs_of_a_batch_to_the_pipelines_in_turn():
    plan = numbered_plan(12)
    shares = [plan.shard(2, i, 3) for i in range(3)]
    assert [share.label.tolist() for share in shares] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert [share.path_b.tolist() for share in shares][1] == ["b2", "b3", "b8", "b9"]  # every array follows its rows
    assert shares[2].box_a.shape == (4, 4)
    assert plan.shard(4, 0, 1) is plan
    for bad in ((0, 0, 1), (2, 3, 3), (2, -1, 3), (2, 0, 0)):
        with pytest.raises(ConfigError, match="shard needs"):
            plan.shard(*bad)


class Pipelines:
    """A stand-in strategy: hands back the dataset function that tf.distribute calls once per input pipeline."""

    def __init__(self, replicas):
        self.num_replicas_in_sync = replicas

    def distribute_datasets_from_function(self, make):
        return make


def _rows(batches):
    """The pairs of some batches as a sorted list of byte strings (images, label, weight)."""
    rows = []
    for x, y, w in batches:
        for i in range(len(y["distance"])):
            rows.append(b"|".join(np.asarray(v[i]).tobytes() for v in (x["image_a"], x["image_b"], y["distance"], w["distance"])))
    return sorted(rows)


@pytest.mark.parametrize("pipelines, replicas", [(2, 2), (2, 4), (4, 4)])
def test_input_pipelines_together_train_on_the_global_batches_of_one_process(synth_dataset, tmp_path, pipelines, replicas):
    # Batch 8, 16 pairs per epoch: 2 steps per epoch; two epochs from epoch 1 (a resumed run).
    config = tiny_config(synth_dataset, tmp_path, batch_size=8, pairs_per_epoch=16, val_pairs=16)
    data = load_training_data(config)
    one_train, one_val, one_val_steps = build_datasets(config, data, 2, 1)
    make_train, make_val, val_steps = build_datasets(config, data, 2, 1, strategy=Pipelines(replicas))
    assert val_steps == one_val_steps == 2

    per_pipeline = replicas // pipelines  # each pipeline feeds this many replicas a batch of 8 / replicas per step
    for one, make, steps in ((one_train, make_train, 4), (one_val, make_val, 2)):
        contexts = [tf.distribute.InputContext(pipelines, i, replicas) for i in range(pipelines)]
        iterators = [iter(make(context)) for context in contexts]
        for step, batch in enumerate(one.take(steps)):
            shares = [next(it) for it in iterators for _ in range(per_pipeline)]
            assert all(len(y["distance"]) == 8 // replicas for _, y, _ in shares)
            assert _rows(shares) == _rows([batch]), f"step {step}: the pipelines' batches are not the one process's batch"


def test_a_worker_restores_from_the_chiefs_backup_and_backs_up_to_its_own_folder(tmp_path):
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)

    def model(seed):
        keras.utils.set_random_seed(seed)
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        m.compile(optimizer="sgd", loss="mse")
        return m

    chief_backup, own_backup = tmp_path / "out" / "backup", tmp_path / "worker" / "backup"
    chief = model(0)
    chief.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(str(chief_backup), delete_checkpoint=False)])
    chief_files = {p.name: p.read_bytes() for p in chief_backup.iterdir()}

    worker = model(1)
    assert not np.allclose(worker.get_weights()[0], chief.get_weights()[0])
    seen = []

    def on_epoch_begin(epoch, logs=None):
        seen.append((epoch, [w.copy() for w in worker.get_weights()]))

    def on_epoch_end(epoch, logs=None):
        seen.append(json.loads((own_backup / "training_metadata.json").read_text()))

    history = worker.fit(x, y, epochs=4, batch_size=4, verbose=0,
                         callbacks=[RestoreFromChief(str(own_backup), str(chief_backup)),
                                    keras.callbacks.LambdaCallback(on_epoch_begin=on_epoch_begin, on_epoch_end=on_epoch_end)])
    assert history.epoch == [2, 3]  # resumed where the chief's backup stands
    assert seen[0][0] == 2
    for resumed, saved in zip(seen[0][1], chief.get_weights()):
        np.testing.assert_array_equal(resumed, saved)
    assert seen[1] == {"epoch": 3, "batch": 0} and seen[3] == {"epoch": 4, "batch": 0}  # its own backup, every epoch
    assert not own_backup.exists()  # removed at the end, like any finished run's
    assert {p.name: p.read_bytes() for p in chief_backup.iterdir()} == chief_files  # the chief's: read, never written


def test_worker_roles_from_the_cluster():
    def role(cluster, task_type, task_id):
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)
        return worker_role(types.SimpleNamespace(cluster_resolver=resolver))

    workers = {"worker": ["h0:1", "h1:1", "h2:1"]}
    with_chief = {"chief": ["c:1"], "worker": ["h0:1", "h1:1"]}
    assert worker_role(types.SimpleNamespace()) == WorkerRole(0, 1, True)
    assert role(workers, "worker", 0) == WorkerRole(0, 3, True)
    assert role(workers, "worker", 2) == WorkerRole(2, 3, False)
    assert role(with_chief, "chief", 0) == WorkerRole(0, 3, True)
    assert role(with_chief, "worker", 0) == WorkerRole(1, 3, False)
    assert role(with_chief, "worker", 1) == WorkerRole(2, 3, False)
    with pytest.raises(ConfigError, match="'ps'"):
        role({"worker": ["h0:1"], "ps": ["p:1"]}, "ps", 0)


def test_loopback_cluster_configs():
    configs = [json.loads(c) for c in loopback_tf_configs(3)]
    workers = configs[0]["cluster"]["worker"]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"] == {"worker": workers} for c in configs)
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") and int(w.split(":")[1]) > 0 for w in workers)
    with_chief = [json.loads(c) for c in loopback_tf_configs(3, chief=True)]
    cluster = with_chief[0]["cluster"]
    assert [c["task"] for c in with_chief] == [{"type": "chief", "index": 0}, {"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    assert sorted(cluster) == ["chief", "worker"] and len(cluster["chief"]) == 1 and len(cluster["worker"]) == 2
    assert all(c["cluster"] == cluster for c in with_chief) and len(set(cluster["chief"] + cluster["worker"])) == 3


def test_auto_distribution_trains_every_chief_and_worker_together():
    # Vertex AI and Kubeflow's TFJob name one chief and N workers: a cluster of N + 1, as worker_role counts it.
    chief_and_worker = {"chief": ["c:1"], "worker": ["w:1"]}
    assert strategy_kind("auto", chief_and_worker, gpus=0) == "multi_worker"
    assert strategy_kind("auto", {"worker": ["w0:1", "w1:1"]}, gpus=0) == "multi_worker"
    assert strategy_kind("auto", {"chief": ["c:1"], "worker": ["w:1"], "evaluator": ["e:1"]}, gpus=0) == "multi_worker"
    assert strategy_kind("auto", {"worker": ["w:1"], "evaluator": ["e:1"]}, gpus=0) == "default"  # an evaluator does not train
    assert strategy_kind("auto", {"chief": ["c:1"]}, gpus=2) == "mirrored"  # one task: its GPUs
    assert strategy_kind("auto", {}, gpus=1) == "default"
    assert strategy_kind("multi_worker", {"chief": ["c:1"]}, gpus=0) == "multi_worker"
    with pytest.raises(ConfigError, match="needs TF_CONFIG"):
        strategy_kind("multi_worker", {}, gpus=0)


def test_only_the_chief_writes_to_the_output_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    out = tmp_path / "run"
    assert worker_write_dir(out, WorkerRole(0, 2, True)) == out
    first = worker_write_dir(out, WorkerRole(1, 2, False))
    assert first.parent == tmp_path / "tmp" and first.is_dir() and not out.exists()
    (first / "left-by-a-killed-run").write_text("x")
    again = worker_write_dir(out, WorkerRole(1, 2, False))
    assert again == first and list(again.iterdir()) == []  # the same folder, emptied
    assert worker_write_dir(out, WorkerRole(2, 3, False)) != first
    assert worker_write_dir(tmp_path / "other", WorkerRole(1, 2, False)) != first


@pytest.mark.parametrize("batch_size, replicas, loss, needed", [
    (32, 2, "robust", 40),  # 8 positives per replica: floor(0.1 * 8) = 0 dropped
    (40, 2, "robust", None),  # 10 per replica: 1 dropped
    (16, 1, "robust", 20),
    (32, 1, "robust", None),
    (32, 2, "contrastive", None),
])
def test_warns_when_a_replicas_share_of_the_batch_is_too_small_for_the_quantile(caplog, batch_size, replicas, loss, needed):
    config = TrainConfig().replace(batch_size=batch_size, loss=loss)  # half the pairs positive, q = 0.9
    with caplog.at_level("WARNING", logger="street2shop.train"):
        _warn_if_the_quantile_cannot_drop(config, TrainingData([], []), replicas)
    warnings = [r.getMessage() for r in caplog.records]
    if needed is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"batch_size {needed} or more" in warnings[0], warnings


# --------------------------------------------------------------------------- real worker processes

TINY = dict(backbone="tiny_cnn", weights="none", image_size=32, embedding_dim=8, pairs_per_epoch=16, val_pairs=8,
            batch_size=8, epochs=2, learning_rate=1e-3, street_augment=0.5, shop_augment=0.3)

# Trains like `street2shop train`, and SIGKILLs itself at the end of a given batch of a given epoch.
KILLABLE_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import keras
    from street2shop.config import TrainConfig
    from street2shop.train import train

    class KillAt(keras.callbacks.Callback):
        def __init__(self, epoch, batch):
            super().__init__()
            self.at, self.epoch = (epoch, batch), None
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if (self.epoch, batch) == self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    kill = json.loads(sys.argv[2])
    train(TrainConfig().replace(**json.loads(sys.argv[1])), extra_callbacks=[KillAt(*kill)] if kill else [], verbose=0)
    """
)


def run_workers(commands, logs, tmpdir, timeout=900, chief=False):
    """Runs one process per command as the tasks of a loopback cluster (the first one a ``chief`` task with ``chief``);
    returns their exit codes and pids.

    ``timeout`` only guards against a hang (the test fails then): the verdict never depends on speed.
    """
    procs = []
    for i, (command, tf_config) in enumerate(zip(commands, loopback_tf_configs(len(commands), chief=chief))):
        env = dict(os.environ, TF_CONFIG=tf_config, TMPDIR=str(tmpdir), TF_CPP_MIN_LOG_LEVEL="2")
        with open(logs / f"worker{i}.out", "w") as stdout, open(logs / f"worker{i}.err", "w") as stderr:
            procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=stdout, stderr=stderr))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"workers still running after {timeout} s; stderr of worker 0: {(logs / 'worker0.err').read_text()[-3000:]}")
    return codes, [p.pid for p in procs]


def cli_command(config, output_dir, *extra):
    """The README's recipe: the same `street2shop train --config ... --output-dir ...` on every worker."""
    return [sys.executable, "-m", "street2shop", "train", "--json", "--config", str(config), "--output-dir", str(output_dir), *extra]


def logged_epochs(out):
    with open(out / "log.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.slow(minutes=1)
def test_two_workers_resume_after_one_is_killed_and_leave_only_the_chiefs_files(synth_dataset, tmp_path):
    out, tmpdir = tmp_path / "run", tmp_path / "tmp"
    (tmp_path / "killed").mkdir()
    (tmp_path / "resumed").mkdir()
    tmpdir.mkdir()
    values = dict(TINY, manifest=str(synth_dataset), output_dir=str(out))

    # Worker 1 is killed after the first batch of epoch 2; the chief then stops on its own (its peer's heartbeats stop).
    killable = [[sys.executable, "-c", KILLABLE_WORKER, json.dumps(values), json.dumps(kill)] for kill in (None, [1, 0])]
    codes, killed_pids = run_workers(killable, tmp_path / "killed", tmpdir)
    assert codes[1] == -signal.SIGKILL
    assert codes[0] not in (0, None), "the chief finished although a worker was killed"
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    assert logged_epochs(out) == [0]
    assert [p.name for p in tmpdir.iterdir() if p.name.endswith("-worker1")], "the killed worker's temporary folder"

    # Both started again with the same command (the README's recipe): they resume at epoch 2.
    config = save_config(TrainConfig().replace(**values), tmp_path / "run.toml")
    codes, resumed_pids = run_workers([cli_command(config, out)] * 2, tmp_path / "resumed", tmpdir)
    assert codes == [0, 0], (tmp_path / "resumed" / "worker0.err").read_text()[-3000:]
    for i in range(2):
        summary = json.loads((tmp_path / "resumed" / f"worker{i}.out").read_text())
        assert summary["epochs_run"] == 1 and np.isfinite(summary["final"]["loss"]), summary
    assert logged_epochs(out) == [0, 1]
    assert sorted(p.name for p in out.iterdir()) == ["best.keras", "config.toml", "last.keras", "log.csv", "tensorboard"]
    writers = {int(p.name.split(".")[-3]) for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    assert writers and writers <= {killed_pids[0], resumed_pids[0]}, "only the chiefs write TensorBoard logs"
    assert not [p.name for p in tmpdir.iterdir() if p.name.startswith("street2shop-")], "temporary folders removed"

    model = load_checkpoint(out / "best.keras")
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    distance = np.asarray(model({"image_a": pixels, "image_b": pixels[::-1]}, training=False)["distance"])
    assert distance.shape[0] == 2 and np.all(np.isfinite(distance))


@pytest.mark.slow
@pytest.mark.parametrize("chief", [False, True], ids=["workers", "chief-and-worker"])
def test_workers_that_disagree_stop_before_training(synth_dataset, tmp_path, chief):
    # With a chief task, distribution "auto" must see a cluster of two too (it once counted workers only, and
    # both trained alone into output_dir): only then do they compare notes, and stop.
    out = tmp_path / "run"
    config = save_config(TrainConfig().replace(**TINY, manifest=str(synth_dataset)), tmp_path / "run.toml")
    codes, _ = run_workers([cli_command(config, out), cli_command(config, out, "--seed", "1")], tmp_path, tmp_path, chief=chief)
    assert codes == [2, 2]
    for i in range(2):
        assert "the workers disagree on config" in (tmp_path / f"worker{i}.err").read_text()
    assert not out.exists()
