"""The serving contract: what an exported street2shop model offers, and how versions are laid out.

Everything that the exporter writes and that a client, the stand-in server,
the embedders, the search service or a test relies on is named here, once:
the signatures with their inputs and outputs, the model card, the warm-up
file, the model's identity, and numbered version folders. This module imports
no TensorFlow, so clients and tools can read the contract cheaply.

==================  ==========================================================  ===============================
signature           inputs                                                      outputs
==================  ==========================================================  ===============================
``serving_default`` ``image_bytes``: string ``[None]`` (JPEG/PNG/GIF/BMP)       ``embedding``: float32 ``[None, D]``
                                                                                ``model_fingerprint``: string ``[None]``
``embed_boxes``     ``image_bytes``, ``boxes``: float32 ``[None, 4]``             the same
                    (normalised ``[ymin, xmin, ymax, xmax]``)
``embed_pixels``    ``pixels``: float32 ``[None, H, W, 3]`` in ``[0, 255]``        the same
==================  ==========================================================  ===============================

**The model's identity travels with its vectors.** Every signature answers,
beside each embedding, the fingerprint of the model that made it
(``model_fingerprint``, one string per row, so it survives TF Serving's
request batching: the weights' fingerprint, or for an export made with
``tta`` or a mixed ``precision`` a digest of it and of those, :func:`street2shop.export.model_fingerprint`), and TF Serving names the version in every
``PredictResponse.model_spec``. A client therefore learns which model made
each vector through TF Serving's own API, with no side channel, and can
refuse to mix two models (:class:`ModelIdentity`).

**Version folders** (``BASE/<n>/``, as TF Serving reads them): only numeric
names are versions; anything else (a hidden temporary folder, notes) is
ignored. A version is written to a hidden temporary folder beside it and
appears by one atomic rename (:func:`new_version`), so a reader never
sees half of one. Exports and catalogue indexes use the same layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from street2shop.errors import ModelError, ModelMismatchError
from street2shop.fileio import staged_folder

DEFAULT_MODEL_NAME = "street2shop"
METHOD_NAME = "tensorflow/serving/predict"

# Inputs and outputs.
IMAGE_BYTES = "image_bytes"
BOXES = "boxes"
PIXELS = "pixels"
EMBEDDING = "embedding"
FINGERPRINT = "model_fingerprint"

# Signatures.
SERVING_DEFAULT = "serving_default"
EMBED_BOXES = "embed_boxes"
EMBED_PIXELS = "embed_pixels"

# Files of an export version.
SAVED_MODEL_FILE = "saved_model.pb"
ASSETS_EXTRA = "assets.extra"
CARD_FILE = "street2shop.json"
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_REQUESTS = 1000  # TF Serving replays at most this many
CARD_KEYS = ("dimension", "image_size", "backbone", "fingerprint", "version", "package_version", "created_at", "signatures")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A named input or output: dtype name and shape (None = any size; "D", "H", "W" = the model's own)."""

    dtype: str
    shape: tuple[int | str | None, ...]
    doc: str = ""

    @property
    def rank(self) -> int:
        return len(self.shape)

    def describe(self) -> str:
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        return f"{self.dtype} [{dims}]" + (f" {self.doc}" if self.doc else "")


@dataclasses.dataclass(frozen=True)
class Signature:
    """One serving signature: its inputs and its outputs, by name."""

    name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]

    def problems(self, inputs: Mapping[str, tuple[str, int]], outputs: Mapping[str, tuple[str, int]]) -> list[str]:
        """What a served signature (name → (dtype name, rank)) lacks of this one; empty when it follows it."""
        found = []
        if set(inputs) != set(self.inputs):
            found.append(f"inputs {sorted(self.inputs)}")
        for key, spec in self.inputs.items():
            if key in inputs and tuple(inputs[key]) != (spec.dtype, spec.rank):
                found.append(f"input {key!r} of {spec.dtype} with rank {spec.rank}")
        for key, spec in self.outputs.items():
            if key not in outputs:
                found.append(f"an output named {key!r}")
            elif tuple(outputs[key]) != (spec.dtype, spec.rank):
                found.append(f"output {key!r} {spec.describe()}")
        return found

    def describe(self) -> dict[str, dict[str, str]]:
        """For the model card: ``{"inputs": {name: "dtype [shape]"}, "outputs": {...}}``."""
        return {
            "inputs": {k: v.describe() for k, v in self.inputs.items()},
            "outputs": {k: v.describe() for k, v in self.outputs.items()},
        }


_OUTPUTS = {
    EMBEDDING: TensorSpec("float32", (None, "D"), "unit length"),
    FINGERPRINT: TensorSpec("string", (None,), "weights fingerprint, the same on every row"),
}
SIGNATURES: dict[str, Signature] = {
    SERVING_DEFAULT: Signature(SERVING_DEFAULT, {IMAGE_BYTES: TensorSpec("string", (None,), "JPEG/PNG/GIF/BMP")}, _OUTPUTS),
    EMBED_BOXES: Signature(
        EMBED_BOXES,
        {IMAGE_BYTES: TensorSpec("string", (None,)), BOXES: TensorSpec("float32", (None, 4), "normalised ymin, xmin, ymax, xmax")},
        _OUTPUTS,
    ),
    EMBED_PIXELS: Signature(EMBED_PIXELS, {PIXELS: TensorSpec("float32", (None, "H", "W", 3), "in [0, 255]")}, _OUTPUTS),
}


# --------------------------------------------------------------------------- the model's identity


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """Which model made a set of vectors: the weights' fingerprint, and the version it was served or exported as.

    Two identities are the same model when their fingerprints are equal; the
    version is a label (a re-export of the same weights under a new number is
    the same model).

    Args:
        fingerprint: str. :func:`street2shop.export.model_fingerprint` of the tower: its
            weights' fingerprint, or a digest of it and the test-time augmentation or mixed precision of an export.
        version: int or None. The export version (TF Serving's version number);
            None for a model held in memory.
        dimension: int or None. The embedding size, when known.
    """

    fingerprint: str
    version: int | None = None
    dimension: int | None = None

    def same_model(self, other: ModelIdentity | None) -> bool:
        return other is not None and self.fingerprint == other.fingerprint

    def __str__(self) -> str:
        version = "" if self.version is None else f" (version {self.version})"
        return f"model {self.fingerprint}{version}"

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "version": self.version, "dimension": self.dimension}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ModelIdentity | None:
        """The identity a file recorded (``{"fingerprint", "version", "dimension"}``); None if it recorded none."""
        if not values or not values.get("fingerprint"):
            return None
        version = values.get("version")
        dimension = values.get("dimension")
        return cls(str(values["fingerprint"]), None if version is None else int(version), None if dimension is None else int(dimension))


def check_same_model(expected: ModelIdentity | None, actual: ModelIdentity | None, what: str) -> None:
    """Raises ModelMismatchError unless ``actual`` is the model ``expected`` names (either unknown: no check)."""
    if expected is None or actual is None:
        return
    if expected.dimension is not None and actual.dimension is not None and expected.dimension != actual.dimension:
        raise ModelMismatchError(
            f"{what} gives embeddings of dimension {actual.dimension} ({actual}) but {expected.dimension} are needed ({expected}). "
            f"Received: dimension={actual.dimension}"
        )
    if not expected.same_model(actual):
        raise ModelMismatchError(
            f"{what} uses {actual}, but the index or embeddings come from {expected}; embed the catalogue again with "
            f"this model, or use the model they were made with. Received: fingerprint={actual.fingerprint!r}"
        )


# --------------------------------------------------------------------------- the model card


def card_path(version_dir: str | os.PathLike[str]) -> Path:
    return Path(version_dir) / ASSETS_EXTRA / CARD_FILE


def warmup_path(version_dir: str | os.PathLike[str]) -> Path:
    return Path(version_dir) / ASSETS_EXTRA / WARMUP_FILE


def read_card(version_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The model card of an exported version (``assets.extra/street2shop.json``)."""
    path = card_path(version_dir)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"no model card at {path}: is {version_dir} a street2shop export?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read model card {path}: {e}") from None
    if not isinstance(card, dict) or "fingerprint" not in card or "dimension" not in card:
        raise ModelError(f"model card {path} lacks the fingerprint or the dimension. Received: keys {sorted(card) if isinstance(card, dict) else type(card).__name__}")
    return card


def card_identity(version_dir: str | os.PathLike[str], card: Mapping[str, Any] | None = None) -> ModelIdentity:
    """The identity of an exported version: its card's fingerprint, the folder's number, the card's dimension."""
    card = read_card(version_dir) if card is None else card
    name = Path(version_dir).name
    version = int(name) if name.isdigit() else card.get("version")
    return ModelIdentity(str(card["fingerprint"]), None if version is None else int(version), int(card["dimension"]))


# --------------------------------------------------------------------------- version folders


def numbered_folders(base: str | os.PathLike[str], complete: Callable[[Path], bool] | None = None) -> dict[int, Path]:
    """``{version: folder}`` of the numerically named folders under ``base`` (none if it is missing).

    Hidden and other non-numeric entries are not versions. With
    ``complete``, only folders for which it is true count (``{}`` if none).
    """
    base = Path(base)
    if not base.is_dir():
        return {}
    found = {int(p.name): p for p in base.iterdir() if p.name.isdigit() and p.is_dir()}
    return {v: p for v, p in sorted(found.items()) if complete is None or complete(p)}


def next_version(base: str | os.PathLike[str]) -> int:
    """One more than the largest numbered folder under ``base`` (complete or not), 1 for none."""
    return max(numbered_folders(base), default=0) + 1


@contextlib.contextmanager
def new_version(base: str | os.PathLike[str], version: int) -> Iterator[Path]:
    """A hidden staging folder to write version ``version`` into; it becomes ``base/<version>`` in one rename when the block ends.

    If the block raises, nothing is published (:func:`street2shop.fileio.staged_folder`).

    Raises:
        FileExistsError: the version exists (versions are never overwritten).
    """
    with staged_folder(Path(base) / str(version)) as staging:
        yield staging


def is_export_version(path: Path) -> bool:
    return (path / SAVED_MODEL_FILE).is_file() or (path / "saved_model.pbtxt").is_file()


def export_versions(export_base: str | os.PathLike[str]) -> dict[int, Path]:
    """The numbered SavedModel versions under an export base, ``{version: folder}``.

    Raises:
        ModelError: the folder is missing, is itself a version, or holds no version.
    """
    base = Path(export_base)
    if not base.is_dir():
        raise ModelError(f"export base {base} is not a folder: expected a folder holding numbered SavedModel versions (1/, 2/, ...). Received: {base}")
    if is_export_version(base):
        raise ModelError(
            f"{base} is a single SavedModel version, not an export base; pass its parent folder {base.parent} "
            f"(TF Serving serves numbered versions under a base path). Received: {base}"
        )
    versions = numbered_folders(base, is_export_version)
    if not versions:
        entries = sorted(p.name for p in base.iterdir())[:10]
        raise ModelError(
            f"no SavedModel version under {base}: expected numbered folders like {base / '1'} holding {SAVED_MODEL_FILE} "
            f"(export one with `street2shop export`). Received: entries {entries}"
        )
    return versions


def resolve_export(path: str | os.PathLike[str]) -> Path:
    """A version folder: ``path`` itself if it is one, else the newest version under the export base ``path``."""
    path = Path(path)
    if is_export_version(path):
        return path
    versions = export_versions(path)
    return versions[max(versions)]
