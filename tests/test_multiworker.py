"""Training on several workers: the pair plans dealt to input pipelines."""

import numpy as np
import pytest
import tensorflow as tf

from street2shop.data.pairs import PairPlan
from street2shop.errors import ConfigError
from street2shop.train import build_datasets, load_training_data
from tests.test_train import tiny_config


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
