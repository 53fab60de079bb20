"""Training on several machines: which strategy, who writes where, what every worker must agree on, and Keras' gaps.

``MultiWorkerMirroredStrategy`` runs the same program on every worker (each
started with its own ``TF_CONFIG``) and keeps them in lockstep through
collective all-reduces. So:

- **One cluster.** ``TF_CONFIG`` names it; every ``chief`` and ``worker``
  task trains (:func:`training_tasks`), so ``distribution="auto"`` takes
  ``MultiWorkerMirroredStrategy`` for any two of them (:func:`get_strategy`),
  whether the cluster has a ``chief`` (Vertex AI, Kubeflow's TFJob) or not.
- **One writer.** The chief (task ``chief``, or worker 0 when the cluster
  has no ``chief`` job) writes the run's files in ``output_dir``; every other
  worker runs the same callbacks into a temporary folder of its own
  (:func:`worker_write_dir`), removed at the end. Keras 3 saves without any
  collective, so nothing requires the others to write; they still do, as
  Keras' multi-worker guide has it, so every worker does the same work
  between two steps.
- **One run.** Every worker must draw the same pair plans and resume at the
  same epoch from the same weights, or their collectives pair up the wrong
  steps (a hang, or silently different models). :func:`check_workers_agree`
  compares fingerprints of what each worker loaded before anything trains.
- **Keras 3 gaps** (3.15 with TF 2.21; :func:`multi_worker_fit`): ``fit``
  averages each step's logs across workers with ``axis=0`` on scalars and
  reduces a whole input batch across workers to build the model; both fail
  under ``MultiWorkerMirroredStrategy``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from street2shop.errors import ConfigError

logger = logging.getLogger(__name__)


TRAINING_JOBS = ("chief", "worker")  # the tasks of a TF_CONFIG cluster that train; an "evaluator" or a "ps" does not


def training_tasks(cluster: Mapping[str, Any]) -> int:
    """How many tasks of a cluster spec (``{"chief": [...], "worker": [...]}``) train: its chief and its workers."""
    return sum(len(cluster.get(job) or ()) for job in TRAINING_JOBS)


def tf_config() -> dict[str, Any]:
    """The ``TF_CONFIG`` environment variable, parsed (``{}`` when unset)."""
    import json

    text = os.environ.get("TF_CONFIG", "") or "{}"
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG must be JSON naming the cluster and this task. Received: TF_CONFIG={text[:200]!r} ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"TF_CONFIG must be a JSON object. Received: TF_CONFIG={text[:200]!r}")
    return value


def strategy_kind(name: str, cluster: Mapping[str, Any], gpus: int) -> str:
    """Which strategy ``distribution=name`` means here: ``"multi_worker"``, ``"mirrored"`` or ``"default"``.

    ``"auto"`` takes ``multi_worker`` when the cluster (``TF_CONFIG``'s) has
    more than one training task (chief and workers alike), else ``mirrored``
    over several GPUs, else ``default``.

    Raises:
        ConfigError: ``multi_worker`` without a cluster to train on.
    """
    tasks = training_tasks(cluster)
    if name == "auto":
        name = "multi_worker" if tasks > 1 else "mirrored" if gpus > 1 else "default"
    if name == "multi_worker" and tasks < 1:
        raise ConfigError("distribution='multi_worker' needs TF_CONFIG naming the cluster's chief and workers. "
                          "Received: TF_CONFIG unset or without a chief or workers")
    return name


def get_strategy(name: str = "auto") -> Any:
    """The ``tf.distribute`` strategy for ``name`` (see ``FitConfig.distribution`` and :func:`strategy_kind`)."""
    import tensorflow as tf

    cluster = tf_config().get("cluster") or {}
    gpus = len(tf.config.list_logical_devices("GPU")) if name == "auto" and training_tasks(cluster) <= 1 else 0
    kind = strategy_kind(name, cluster, gpus)
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """This process's place in the cluster.

    Attributes:
        index: int. Position among the training tasks (the chief first).
        count: int. Training tasks in the cluster (1 without a cluster).
        is_chief: bool. Whether this task writes the run's files.
    """

    index: int = 0
    count: int = 1
    is_chief: bool = True


def worker_role(strategy: Any) -> WorkerRole:
    """The :class:`WorkerRole` of this process under ``strategy`` (one chief of one without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return WorkerRole()
    cluster = resolver.cluster_spec().as_dict()
    chiefs, tasks = len(cluster.get("chief", ())), training_tasks(cluster)
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    if task_type == "chief":
        return WorkerRole(0, tasks, True)
    if task_type != "worker":
        raise ConfigError(f"only 'chief' and 'worker' tasks train. Received: TF_CONFIG task type {task_type!r}")
    return WorkerRole(chiefs + task_id, tasks, chiefs == 0 and task_id == 0)


def worker_write_dir(output_dir: str | Path, role: WorkerRole) -> Path:
    """Where this worker writes: ``output_dir`` for the chief, else an emptied temporary folder of its own.

    The temporary folder's name depends only on ``output_dir`` and the
    worker's index, so a worker killed before it could remove its folder
    finds and empties it when started again, rather than leaving one per run.
    """
    if role.is_chief:
        return Path(output_dir)
    key = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"street2shop-{key}-worker{role.index}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def fingerprint(value: Any) -> int:
    """A 31-bit fingerprint of ``repr(value)`` (compared across workers, so it fits an int32)."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:4], "big") & 0x7FFFFFFF


def check_workers_agree(strategy: Any, facts: Mapping[str, Any]) -> None:
    """Raises ConfigError on every worker unless all workers hold the same ``facts``.

    ``facts`` maps a name to an int (compared as is, and shown) or anything
    else (compared by :func:`fingerprint`). Gathers one small int32 vector per
    replica: one collective, which also waits for every worker to get here.
    """
    import numpy as np
    import tensorflow as tf

    names = sorted(facts)
    local = [facts[n] if isinstance(facts[n], int) and not isinstance(facts[n], bool) else fingerprint(facts[n]) for n in names]
    if any(not -(2**31) <= v < 2**31 for v in local):
        raise ConfigError(f"facts compared across workers must fit an int32. Received: {dict(zip(names, local))}")
    mine = tf.constant(local, tf.int32)
    gathered = tf.function(lambda: strategy.gather(strategy.run(lambda: tf.identity(mine)), axis=0))()
    table = np.asarray(gathered).reshape(-1, len(names))
    differ = [name for j, name in enumerate(names) if len(set(table[:, j].tolist())) > 1]
    if differ:
        rows = "; ".join(f"{name}: " + ", ".join(f"replica {i} {table[i, names.index(name)]}" for i in range(len(table))) for name in differ)
        raise ConfigError(
            f"the workers disagree on {', '.join(differ)}: every worker must run the same command on the same data, with "
            f"output_dir on a file system they all share (the chief's backup is where they all resume from). Received: {rows}"
        )


def _first_replica_spec(spec: Any) -> Any:
    """A per-replica element spec of a distributed dataset, as one replica's ``TensorSpec``s."""
    import tensorflow as tf

    return tf.nest.map_structure(lambda s: s._value_specs[0] if hasattr(s, "_value_specs") else s, spec)


def _symbolic_build_from_spec(self: Any, iterator: Any = None, data_batch: Any = None) -> None:
    """``Model._maybe_symbolic_build`` from the dataset's element spec, without reducing a batch across workers."""
    spec = _first_replica_spec(iterator.data_adapter.get_tf_dataset().element_spec) if iterator is not None else data_batch
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=spec)


def _mean_over_replicas(original: Any) -> Any:
    """Keras' ``reduce_per_replica``, but a multi-worker mean of scalar logs is one all-reduce of them all, stacked."""
    import tensorflow as tf

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        multi = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and worker_role(strategy).count > 1
        flat = tf.nest.flatten(values)
        if not multi or reduction not in ("auto", "mean") or not flat or any(
                strategy.experimental_local_results(v)[0].shape.rank != 0 for v in flat):
            return original(values, strategy, reduction=reduction)
        dtypes = [v.dtype for v in flat]
        stacked = strategy.run(lambda *vs: tf.stack([tf.cast(v, tf.float32) for v in vs]), args=tuple(flat))
        mean = strategy.reduce("MEAN", stacked, axis=None)
        return tf.nest.pack_sequence_as(values, [tf.cast(m, d) for m, d in zip(tf.unstack(mean), dtypes)])

    return reduce_per_replica


@contextlib.contextmanager
def multi_worker_fit(model: Any) -> Iterator[None]:
    """Within it, ``model.fit`` and ``model.evaluate`` work under ``MultiWorkerMirroredStrategy``.

    Keras 3.15's TensorFlow trainer (a) averages each step's logs across
    replicas with ``strategy.reduce("MEAN", v, axis=0)``, which fails on a
    scalar once the strategy spans workers; here they are averaged as scalars,
    all in one all-reduce, so every worker logs (and ``TerminateOnNaN`` sees)
    the same global values; (b) builds the model's metrics from a batch it
    first averages across workers, which fails on a nested batch; here they
    are built from the dataset's element spec. The step functions traced
    inside keep (a).
    """
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    trainer.reduce_per_replica = _mean_over_replicas(original)
    model._maybe_symbolic_build = types.MethodType(_symbolic_build_from_spec, model)
    try:
        yield
    finally:
        trainer.reduce_per_replica = original
        del model._maybe_symbolic_build


def loopback_tf_configs(count: int, *, chief: bool = False) -> list[str]:
    """``TF_CONFIG`` values for a cluster of ``count`` training tasks on this machine (free loopback ports).

    Without ``chief``, ``count`` workers (worker 0 is the chief); with it, one
    ``chief`` task and ``count - 1`` workers, as Vertex AI and Kubeflow's
    TFJob lay a cluster out. For tests and benchmarks. The ports are free when
    picked; another program could take one before the tasks bind it.
    """
    import json
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()
    if not chief:
        return [json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}}) for i in range(count)]
    cluster = {"chief": addresses[:1], "worker": addresses[1:]}
    tasks = [{"type": "chief", "index": 0}] + [{"type": "worker", "index": i} for i in range(count - 1)]
    return [json.dumps({"cluster": cluster, "task": task}) for task in tasks]
