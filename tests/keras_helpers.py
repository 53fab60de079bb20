"""Shared checks for Keras objects (layers, losses, metrics, models).

- :func:`assert_config_round_trip`: ``get_config → from_config → get_config``
  gives identical JSON, and the object also survives Keras' registered
  serialisation (which fails for a class that is not registered).
- :func:`assert_keras_file_round_trip`: a model saved as ``.keras`` reloads
  with ``safe_mode=True`` and gives the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _json(config: Any) -> str:
    return json.dumps(config, sort_keys=True, default=repr)


def assert_config_round_trip(obj: Any) -> Any:
    """Checks ``obj``'s config survives ``from_config`` and Keras serialisation; returns the copy."""
    import keras

    config = obj.get_config()
    json.dumps(config)  # the config must be plain JSON
    clone = type(obj).from_config(config)
    assert type(clone) is type(obj)
    assert _json(clone.get_config()) == _json(config)

    serialized = keras.saving.serialize_keras_object(obj)
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)), safe_mode=True)
    assert type(restored) is type(obj), f"{type(obj).__name__} did not deserialise to itself (is it registered?)"
    assert _json(restored.get_config()) == _json(config)
    return clone


def _flatten_outputs(outputs: Any) -> dict[str, np.ndarray]:
    if isinstance(outputs, dict):
        return {str(k): np.asarray(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return {str(i): np.asarray(v) for i, v in enumerate(outputs)}
    return {"output": np.asarray(outputs)}


def assert_keras_file_round_trip(model: Any, inputs: Any, tmp_path: Path, *, rtol: float = 1e-6, atol: float = 1e-7) -> Any:
    """Saves ``model`` to ``tmp_path/model.keras``, reloads it with ``safe_mode=True``
    and asserts the same outputs on ``inputs`` (inference mode); returns the reloaded model."""
    import keras

    path = Path(tmp_path) / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    expected = _flatten_outputs(model(inputs, training=False))
    actual = _flatten_outputs(loaded(inputs, training=False))
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol, err_msg=key)
    return loaded
