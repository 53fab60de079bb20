"""Configuration: frozen dataclasses per stage, loaded from TOML or JSON and flags.

Every field has a default that works on a laptop CPU, and field names are
unique across sections so each is also a command-line flag of the same name
(``--margin``, ``--image-size``...). A training run writes its resolved
configuration next to its outputs (``config.toml``), so it can be re-run with
``street2shop train --config runs/x/config.toml``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w

from street2shop.errors import ConfigError
from street2shop.fileio import write_atomic
from street2shop.model.backbones import BACKBONES  # the registry; imports no Keras
from street2shop.model.precision import PRECISIONS  # imports no Keras

_UNSET = object()
LR_SCHEDULES = ("constant", "cosine")
JIT_COMPILE = ("auto", "on", "off")


def setting(default: Any, help: str, *, unset: Any = _UNSET) -> Any:
    """A config dataclass field: its default, its help (the CLI flag's) and, where it can be left unset, the value that spells it."""
    return dataclasses.field(default=default, metadata={"help": help} if unset is _UNSET else {"help": help, "unset": unset})


class _Section:
    """What every config section knows of its own fields."""

    def get(self, name: str) -> Any:
        """The value of field ``name``, or None where it holds its "unset" value (TOML has no null: 0, -1 or '')."""
        field = next((f for f in dataclasses.fields(self) if f.name == name), None)  # type: ignore[arg-type]
        if field is None:
            raise ConfigError(f"{type(self).__name__} has no field {name!r}. Received: name={name!r}")
        value = getattr(self, name)
        return None if "unset" in field.metadata and value == field.metadata["unset"] else value


def _check(condition: bool, field: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{field} must be {expected}. Received: {field}={value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    manifest: str = setting("", "manifest CSV of product photos (street and shop)")
    train_split: str = setting("train", "manifest split(s) to train on, comma-separated; shop photos of split 'catalog' are always added")
    val_split: str = setting("val", "manifest split for validation pairs ('' for none)", unset="")
    auxiliary_dir: str = setting("", "class-per-folder labelled set for multi-task fine-tuning ('' for none)", unset="")
    auxiliary_max_per_class: int = setting(0, "use at most this many images per auxiliary class (0 = all)", unset=0)
    image_size: int = setting(96, "square input size of the tower (InceptionV3 needs >= 75; 299 is its native size)")
    pairs_per_epoch: int = setting(2048, "training pairs drawn per epoch")
    val_pairs: int = setting(256, "validation pairs (drawn once, fixed)")
    positive_fraction: float = setting(-1.0, "share of positive pairs (-1 = unset: unset shares split what the set ones leave; all unset: 1/3 each with an auxiliary set, else 1/2)", unset=-1.0)
    negative_fraction: float = setting(-1.0, "share of negative pairs (-1 = unset, see positive_fraction)", unset=-1.0)
    auxiliary_fraction: float = setting(-1.0, "share of auxiliary pairs (-1 = unset, see positive_fraction)", unset=-1.0)
    street_street_fraction: float = setting(0.0, "share of positives pairing two street photos of a product")
    hard_negative_fraction: float = setting(0.5, "share of negatives taken from the same category")
    street_augment: float = setting(1.0, "augmentation strength for street photos (0 = off)")
    shop_augment: float = setting(0.3, "augmentation strength for shop and auxiliary photos")
    check_images: bool = setting(True, "decode every image once before training; drop unreadable ones")

    def __post_init__(self) -> None:
        _check(self.image_size >= 32, "image_size", self.image_size, ">= 32")
        _check(self.pairs_per_epoch >= 1, "pairs_per_epoch", self.pairs_per_epoch, ">= 1")
        _check(self.val_pairs >= 0, "val_pairs", self.val_pairs, ">= 0")
        _check(self.auxiliary_max_per_class >= 0, "auxiliary_max_per_class", self.auxiliary_max_per_class, ">= 0")
        for name in ("positive_fraction", "negative_fraction", "auxiliary_fraction"):
            v = getattr(self, name)
            _check(v == -1.0 or 0.0 <= v <= 1.0, name, v, "in [0, 1], or -1 for the default")
        for name in ("street_street_fraction", "hard_negative_fraction"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, name, v, "in [0, 1]")
        for name in ("street_augment", "shop_augment"):
            v = getattr(self, name)
            _check(0.0 <= v <= 3.0, name, v, "in [0, 3]")

    @property
    def train_splits(self) -> set[str]:
        return _split_names(self.train_split)

    @property
    def val_splits(self) -> set[str]:
        return _split_names(self.val_split)

    def pair_config(self, pairs_per_epoch: int, seed: int) -> Any:
        """The :class:`street2shop.data.pairs.PairConfig` these fields describe."""
        from street2shop.data.pairs import PairConfig

        return PairConfig(
            pairs_per_epoch=pairs_per_epoch,
            positive_fraction=self.get("positive_fraction"),
            negative_fraction=self.get("negative_fraction"),
            auxiliary_fraction=self.get("auxiliary_fraction"),
            street_street_fraction=self.street_street_fraction,
            hard_negative_fraction=self.hard_negative_fraction,
            seed=seed,
        )


def _split_names(text: str) -> set[str]:
    return {s.strip() for s in text.split(",") if s.strip()}


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    backbone: str = setting("inception_v3", f"backbone: one of {', '.join(BACKBONES)}")
    weights: str = setting("imagenet", "'imagenet' (downloads once), 'none' (from scratch) or a path to a weights file")
    embedding_dim: int = setting(128, "dimension of the L2-normalised embedding")
    trainable_layers: int = setting(-1, "train only the top N backbone layers (-1 = all)", unset=-1)
    trainable_from: str = setting("", "train the backbone from this layer up, e.g. mixed8 for inception_v3 ('' = see trainable_layers)", unset="")
    bn_momentum: float = setting(0.0, "momentum of the backbone's BatchNorm statistics (0 = the backbone's own, 0.99); ~0.9 for short runs from scratch", unset=0.0)
    dropout: float = setting(0.0, "dropout before the projection")
    pooling: str = setting("avg", "global pooling: avg or max")
    classifier_scale: float = setting(16.0, "softmax head of multi-task: a cosine classifier with logits scale·cos(embedding, class); 0 = a plain Dense layer", unset=0.0)
    init_checkpoint: str = setting("", "start from the tower weights of this .keras checkpoint (e.g. another run's last.keras; same backbone, image_size and embedding_dim; the classifier head is not taken); '' = off", unset="")

    def __post_init__(self) -> None:
        _check(self.backbone in BACKBONES, "backbone", self.backbone, f"one of {', '.join(BACKBONES)}")
        _check(BACKBONES[self.backbone].family != "street2shop" or self.weights.lower() != "imagenet", "weights", self.weights,
               f"'none' or the path of a weights file for backbone {self.backbone}, which has no ImageNet weights")
        _check(self.embedding_dim >= 2, "embedding_dim", self.embedding_dim, ">= 2")
        _check(self.trainable_layers >= -1, "trainable_layers", self.trainable_layers, ">= 0, or -1 for all")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        _check(0.0 <= self.bn_momentum < 1.0, "bn_momentum", self.bn_momentum, "in [0, 1), 0 for the backbone's own")
        _check(not (self.trainable_from and self.trainable_layers >= 0), "trainable_from", self.trainable_from,
               "empty when trainable_layers is set (give one of them)")
        _check(self.pooling in ("avg", "max"), "pooling", self.pooling, "'avg' or 'max'")
        _check(self.classifier_scale >= 0.0 and math.isfinite(self.classifier_scale), "classifier_scale", self.classifier_scale, "finite and >= 0")

    @property
    def weights_arg(self) -> str | None:
        return None if self.weights.lower() in ("", "none") else self.weights

    def tower_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`street2shop.model.tower.build_tower` (all but ``image_size``)."""
        return {
            "backbone": self.backbone,
            "embedding_dim": self.embedding_dim,
            "weights": self.weights_arg,
            "trainable_layers": self.get("trainable_layers"),
            "trainable_from": self.get("trainable_from"),
            "bn_momentum": self.get("bn_momentum"),
            "dropout": self.dropout,
            "pooling": self.pooling,
        }


@dataclasses.dataclass(frozen=True)
class LossConfig(_Section):
    loss: str = setting("robust", "'robust' (robust contrastive) or 'contrastive' (plain)")
    margin: float = setting(1.0, "contrastive margin m on the distance between unit embeddings (0 < m <= 2)")
    positive_threshold: float = setting(0.0, "robust: drop positives with d >= this fixed threshold (0 = not used)", unset=0.0)
    positive_quantile: float = setting(0.9, "robust: drop positives beyond this quantile of the batch's positive distances (0 = not used)", unset=0.0)
    negative_floor: float = setting(0.0, "robust: drop negatives with d < this floor, probable label noise (0 = not used)", unset=0.0)
    drop_warmup_epochs: int = setting(0, "robust: train this many epochs with the plain contrastive loss before dropping any pair")
    w_pair: float = setting(1.0, "weight of the contrastive loss on product pairs")
    w_aux: float = setting(1.0, "weight of the contrastive loss on auxiliary pairs")
    w_cls: float = setting(0.5, "weight of each softmax loss on auxiliary images")
    w_product: float = setting(0.5, "weight of each softmax loss on product images: a softmax over the training products (those with street photos in the training split and a shop photo), in the auxiliary set's head if there is one; 0 = off (the head holds a vector per product: consider 0 for millions)")

    def __post_init__(self) -> None:
        _check(self.loss in ("robust", "contrastive"), "loss", self.loss, "'robust' or 'contrastive'")
        _check(0.0 < self.margin <= 2.0, "margin", self.margin, "in (0, 2]")
        _check(0.0 <= self.positive_threshold <= 2.0, "positive_threshold", self.positive_threshold, "in [0, 2]")
        _check(0.0 <= self.positive_quantile <= 1.0, "positive_quantile", self.positive_quantile, "in [0, 1]")
        _check(0.0 <= self.negative_floor < self.margin, "negative_floor", self.negative_floor, f"in [0, margin={self.margin})")
        _check(self.drop_warmup_epochs >= 0, "drop_warmup_epochs", self.drop_warmup_epochs, ">= 0")
        for name in ("w_pair", "w_aux", "w_cls", "w_product"):
            v = getattr(self, name)
            _check(v >= 0.0 and math.isfinite(v), name, v, ">= 0")

    def robust_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`street2shop.losses.RobustContrastiveLoss`."""
        return {
            "margin": self.margin,
            "positive_threshold": self.get("positive_threshold"),
            "positive_quantile": self.get("positive_quantile"),
            "negative_floor": self.get("negative_floor"),
        }


@dataclasses.dataclass(frozen=True)
class FitConfig(_Section):
    output_dir: str = setting("runs/street2shop", "where checkpoints, logs and the resolved config go")
    epochs: int = setting(10, "number of epochs")
    batch_size: int = setting(32, "global batch size (split across devices)")
    optimizer: str = setting("adamw", "'adamw' or 'sgd' (with momentum)")
    learning_rate: float = setting(1e-3, "learning rate of the head (and of the backbone unless backbone_lr_multiplier); the peak of a schedule")
    lr_schedule: str = setting("constant", "'constant', or 'cosine': from learning_rate down to 0 over the run's steps (a cosine), after any warm-up")
    warmup_epochs: float = setting(0.0, "raise the learning rate linearly from 0 over this many epochs (fractions allowed) before the schedule")
    backbone_lr_multiplier: float = setting(1.0, "the backbone learns at learning_rate times this (e.g. 0.1 for fine-tuning)")
    weight_decay: float = setting(1e-4, "decoupled weight decay (adamw) or L2-like decay (sgd)")
    momentum: float = setting(0.9, "momentum for sgd")
    early_stopping_patience: int = setting(0, "stop after this many epochs without a better validation loss, or training loss without validation (0 = off)", unset=0)
    distribution: str = setting("auto", "'auto', 'default' (one device), 'mirrored' (all local GPUs) or 'multi_worker' (from TF_CONFIG)")
    precision: str = setting("float32", "Keras dtype policy of training: 'float32', 'mixed_float16' (NVIDIA GPUs with tensor cores; loss scaling) "
                             "or 'mixed_bfloat16' (TPUs, NVIDIA Ampere and newer, CPUs with AMX); a run resumes only under its own")
    jit_compile: str = setting("auto", "XLA compilation of the training step: 'auto' (Keras' choice: on for one GPU, "
                               "off on a CPU or under a distribution strategy), 'on' or 'off'")
    ema_momentum: float = setting(0.0, "keep an exponential moving average of the trainable weights, updated after every step "
                                  "with this momentum (e.g. 0.99: about the last 100 steps), and make it the model: validation, "
                                  "best.keras, last.keras and the exported tower (0 = off)", unset=0.0)
    seed: int = setting(0, "seed of pair plans, weights and augmentation")

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.batch_size >= 2, "batch_size", self.batch_size, ">= 2")
        _check(self.optimizer in ("adamw", "sgd"), "optimizer", self.optimizer, "'adamw' or 'sgd'")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        _check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", self.lr_schedule, " or ".join(repr(s) for s in LR_SCHEDULES))
        _check(0.0 <= self.warmup_epochs < self.epochs and math.isfinite(self.warmup_epochs), "warmup_epochs",
               self.warmup_epochs, f"in [0, epochs={self.epochs})")
        _check(self.backbone_lr_multiplier >= 0, "backbone_lr_multiplier", self.backbone_lr_multiplier, ">= 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _check(self.early_stopping_patience >= 0, "early_stopping_patience", self.early_stopping_patience, ">= 0")
        _check(self.distribution in ("auto", "default", "mirrored", "multi_worker"), "distribution", self.distribution,
               "'auto', 'default', 'mirrored' or 'multi_worker'")
        _check(self.precision in PRECISIONS, "precision", self.precision, " or ".join(repr(p) for p in PRECISIONS))
        _check(self.jit_compile in JIT_COMPILE, "jit_compile", self.jit_compile, " or ".join(repr(j) for j in JIT_COMPILE))
        _check(0.0 <= self.ema_momentum < 1.0, "ema_momentum", self.ema_momentum, "in [0, 1)")

    @property
    def jit_compile_arg(self) -> bool | str:
        """``jit_compile`` as ``model.compile`` takes it: ``"auto"``, True or False."""
        return {"auto": "auto", "on": True, "off": False}[self.jit_compile]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, in four sections (TOML tables of the same names)."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    fit: FitConfig = FitConfig()

    SECTIONS: typing.ClassVar[dict[str, type]] = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "fit": FitConfig}

    def __post_init__(self) -> None:
        minimum = max(32, BACKBONES[self.model.backbone].min_size)
        _check(self.data.image_size >= minimum, "image_size", self.data.image_size, f">= {minimum} for backbone {self.model.backbone}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Builds from ``{"data": {...}, "model": {...}, ...}``; unknown keys are errors."""
        unknown = set(values) - set(cls.SECTIONS)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}. Expected: {sorted(cls.SECTIONS)}")
        parts = {name: section_from_dict(kind, values.get(name, {}), source=f"{source} [{name}]") for name, kind in cls.SECTIONS.items()}
        return cls(**parts)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}

    def replace(self, **flat: Any) -> TrainConfig:
        """A copy with fields replaced by their (globally unique) names."""
        updates: dict[str, dict[str, Any]] = {name: {} for name in self.SECTIONS}
        owner = field_owners()
        for key, value in flat.items():
            if key not in owner:
                raise ConfigError(f"unknown config field {key!r}. Known: {', '.join(sorted(owner))}")
            updates[owner[key]][key] = value
        parts = {}
        for name in self.SECTIONS:
            current = getattr(self, name)
            parts[name] = section_from_dict(type(current), {**dataclasses.asdict(current), **updates[name]}, source=f"[{name}]")
        return TrainConfig(**parts)


def field_owners() -> dict[str, str]:
    """Field name → section name, for every field of every section."""
    return {f.name: section for section, kind in TrainConfig.SECTIONS.items() for f in dataclasses.fields(kind)}


def _coerce(name: str, kind: Any, value: Any, source: str) -> Any:
    """``value`` (from TOML, JSON or a flag's text) as field ``name``'s type ``kind``, or ConfigError."""
    if isinstance(kind, types.UnionType):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: {name} must be {kind.__name__}. Received: {name}={value!r}")


def section_from_dict(kind: type, values: dict[str, Any], *, source: str) -> Any:
    """A config dataclass ``kind`` from ``{field: value}``, each value coerced to its field's type; unknown keys are errors."""
    types_of = field_types(kind)
    unknown = set(values) - set(types_of)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {sorted(unknown)}. Known: {', '.join(types_of)}")
    return kind(**{k: _coerce(k, types_of[k], v, source) for k, v in values.items()})


def field_types(kind: type) -> dict[str, Any]:
    """A dataclass's field name → its type, the annotations resolved (``typing.get_type_hints``)."""
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind)}


def read_config_values(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sections and fields a TOML (``.toml``) or JSON (``.json``) configuration file sets itself, unchecked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse {path}: {e}") from None


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Reads a TOML (``.toml``) or JSON (``.json``) configuration file."""
    return TrainConfig.from_dict(read_config_values(path), source=str(path))


def save_config(config: TrainConfig, path: str | os.PathLike[str]) -> Path:
    """Writes TOML (or JSON for a ``.json`` path) atomically."""
    path = Path(path)
    data = config.to_dict()
    text = json.dumps(data, indent=2) + "\n" if path.suffix.lower() == ".json" else tomli_w.dumps(data)
    return write_atomic(path, text)
