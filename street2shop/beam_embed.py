"""Catalogue embedding on Apache Beam (``street2shop beam-embed``), for catalogues beyond one machine.

The twin of :mod:`street2shop.embed` for a distributed engine (Dataflow,
Flink, Spark, or Beam's local runner), built from the same parts:

::

    manifest shards (a CSV or a glob; FileSystems, so gs:// and s3:// too)
      → rows (data.records.manifest_rows) → references (data.records.is_catalogue) → Reshuffle
      → image bytes (FileSystems) → checks (data.image.check_photo) ──────────────► dead letter
      → RunInference(KeyedModelHandler(SavedModelHandler)).with_exception_handling()
            model rejects an image: its batch is retried image by image
            (embedders.embed_isolating) ──────────────────────────────────────────► dead letter
            a batch fails otherwise (failed_inferences) ───────────────────────────► dead letter
      → a shard per block of manifest lines → GroupByKey
      → OUT/<run>/shard-MMMMMM-BBBBBBBBB/: embeddings.npy, items.jsonl, embed.json
        (embeddings.encode_embeddings) and dead_letter.jsonl
      → with --to-milvus: the shard's rows upserted into the run's new Milvus
        collection, in batches, by the worker that wrote the shard

A shard holds the rows of ``shard_rows`` consecutive lines of one manifest,
in their order, and ``shards.json`` lists the shards in manifest order: the
output's rows come in the order ``street2shop embed`` writes them, so an index
built over either is the same, ties included.

Every image is embedded or lands in the dead letter with its reason, and is
counted there. The SavedModel (bytes in, ``serving_default``; ``embed_boxes``
for boxed rows) is loaded with ``tf.saved_model.load`` in each worker process
once (RunInference shares it across the process's threads), not with Beam's
``TFModelHandler*``, which calls ``keras.models.load_model`` and Keras 3
refuses SavedModels. The model's identity is what the model answers
(``model_fingerprint``), per batch; a run whose batches name two models
publishes nothing.

**Publishing.** Each run writes a fresh ``OUT/run-<time>-<id>/``. When the
pipeline has finished, the launcher checks the shards (one model, something
embedded), writes ``OUT/shards.json`` naming that run's shards (atomically:
a rename locally, one object write on a bucket) and deletes the run it
replaces. A reader that goes through ``shards.json``
(:func:`street2shop.embeddings.embedding_folders`, so ``index build OUT``)
sees one whole run, the old or the new, never a mix. A failed run publishes
nothing and leaves the previous output as it was.

**Into Milvus** (``--to-milvus milvus:URI#NAME``): the launcher makes the
index's next version (an unfinished collection, :mod:`street2shop.index.milvus_write`)
before the pipeline starts; each shard's writer upserts its rows into it
(an upsert, so a bundle Beam retries writes the same entities again), their
rows ``manifest << 32 | line`` (manifest order, so the ties of ``index build``
over the shards); when the run is published, the launcher publishes the
version (flush, index, load, alias). A failed run drops the collection and
the alias still names the old version. The workers connect with the token in
their own ``MILVUS_TOKEN``. A Milvus Lite file is held by one process, so it
takes the in-process runner only.

**Runners.** ``DirectRunner`` (the default) runs Beam's FnApiRunner directly:
Beam's own DirectRunner would first try the Prism runner, which downloads a
binary. Several worker processes: ``--direct_running_mode multi_processing
--direct_num_workers N``. Anything else is a standard Beam runner with its
standard options (``--runner DataflowRunner --project ... --region ...
--temp_location gs://...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np


class _WithoutGcpNotice(logging.Filter):
    """Beam warns on the root logger at import when its GCP extras are absent; irrelevant off Google Cloud."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


_notice = _WithoutGcpNotice()
logging.getLogger().addFilter(_notice)
try:
    import apache_beam as beam
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
finally:
    logging.getLogger().removeFilter(_notice)

from street2shop import contract, errors
from street2shop.contract import ModelIdentity
from street2shop.data.image import DEFAULT_MAX_PIXELS, check_photo
from street2shop.data.records import (
    DEFAULT_REFERENCE_SPLITS,
    Record,
    catalogue_splits,
    is_catalogue,
    manifest_root,
    manifest_rows,
    reference_domains,
)
from street2shop.embedders import call_savedmodel, embed_isolating, load_savedmodel
from street2shop.embeddings import SHARDS_FILE, SUMMARY_FILE, decode_shards, encode_embeddings, encode_shards
from street2shop.errors import ConfigError, DataError, ImageError, ModelError, ModelMismatchError, Street2ShopError, check_positive_int
from street2shop.fileio import write_atomic
from street2shop.items import Item, domain_counts

logger = logging.getLogger(__name__)

DEAD = "dead_letter"
DEAD_LETTER_FILE = "dead_letter.jsonl"
LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner")
METRICS = "street2shop"


class Row(NamedTuple):
    """A manifest row: which manifest (its index in the sorted match), which line, and the record."""

    source: int
    line: int
    record: Record


class Rejected(NamedTuple):
    """The inference of an image the model rejected on its own (its batch was retried image by image)."""

    reason: str


def is_remote(path: str) -> bool:
    return "://" in path


# --------------------------------------------------------------------------- reading


def match_manifests(pattern: str) -> list[str]:
    """The manifest files a path or glob names (through FileSystems), sorted; DataError if none."""
    if not is_remote(pattern) and os.path.isdir(pattern):
        raise DataError(f"{pattern} is a folder: beam-embed reads a manifest CSV or a glob of manifest shards "
                        f"(like 'manifests/part-*.csv'). Received: {pattern}")
    try:
        found = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception as e:  # BeamIOError, or an unknown scheme (ValueError)
        raise DataError(f"cannot list the manifests {pattern}: {e}") from None
    if not found:
        raise DataError(f"no manifest matches {pattern}: expected a CSV file or a glob of CSV shards. Received: {pattern}")
    return found


class _Readable(io.RawIOBase):
    """Any FileSystems handle (a compressed one has no ``readinto``) as a raw stream a TextIOWrapper can read."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.handle.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def read_manifest_file(numbered: tuple[int, str]) -> Iterator[Row]:
    """The rows of one manifest shard, read through FileSystems (``.gz`` and ``.bz2`` are decompressed), streamed."""
    index, path = numbered
    with FileSystems.open(path) as raw:
        text = io.TextIOWrapper(io.BufferedReader(_Readable(raw)), encoding="utf-8-sig", newline="")
        for line, record in manifest_rows(text, path, manifest_root(path)):
            yield Row(index, line, record)


class ReadAndCheck(beam.DoFn):
    """Row → ``(row, (bytes, normalised box or None))``; an unreadable or bad image → the dead letter, with its reason."""

    def __init__(self, *, crop_to_box: bool, max_pixels: int, decode_check: bool) -> None:
        self.crop_to_box = crop_to_box
        self.max_pixels = max_pixels
        self.decode_check = decode_check
        self.bad = beam.metrics.Metrics.counter(METRICS, "bad_images")

    def process(self, row: Row) -> Iterator[Any]:
        path = row.record.image_path
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                data = handle.read()
        except OSError as e:  # BeamIOError is one
            self.bad.inc()
            yield beam.pvalue.TaggedOutput(DEAD, (row, f"cannot read {path}: {e}", "read"))
            return
        try:
            box = check_photo(data, row.record.box if self.crop_to_box else None, max_pixels=self.max_pixels,
                              decode=self.decode_check)
        except ImageError as e:
            self.bad.inc()
            yield beam.pvalue.TaggedOutput(DEAD, (row, str(e), "check"))
            return
        yield row, (data, box)


# --------------------------------------------------------------------------- the model


class SavedModelHandler(ModelHandler):
    """RunInference's model: an exported SavedModel, encoded images in, a vector or a :class:`Rejected` out.

    Examples are ``(bytes, normalised box or None)`` (checked already);
    predictions are ``PredictionResult(example, vector, fingerprint)``, or
    ``PredictionResult(example, Rejected(reason), None)`` for an image the
    model rejected: a batch the model refuses is retried image by image, so
    the rest of it is still embedded.

    Args:
        model_path: str. A version folder of an export (local, or any path
            ``tf.saved_model.load`` reads).
        batch_size: int. The most images per model call.
        min_batch_size: int. The fewest (Beam's BatchElements grows batches
            between the two; a bundle's last batch may be smaller).
        quiet: bool. Keep TensorFlow's C++ start-up lines (absl's notice,
            oneDNN, the CUDA probe on a machine without a GPU driver) off each
            worker process's stderr, as the command line keeps them off its
            own (:func:`street2shop.console.quiet_tensorflow`); real errors
            still show.
    """

    def __init__(self, model_path: str, *, batch_size: int = 32, min_batch_size: int | None = None, quiet: bool = True) -> None:
        check_positive_int("batch_size", batch_size)
        check_positive_int("min_batch_size", min_batch_size, allow_none=True)
        smallest = batch_size if min_batch_size is None else min_batch_size
        if smallest > batch_size:
            raise ConfigError(f"min_batch_size must not exceed batch_size. Received: min_batch_size={smallest}, batch_size={batch_size}")
        super().__init__(min_batch_size=smallest, max_batch_size=batch_size)
        self.model_path = str(model_path)
        self.version = int(posixpath.basename(self.model_path.rstrip("/"))) if posixpath.basename(self.model_path.rstrip("/")).isdigit() else None
        self.quiet = bool(quiet)

    def load_model(self) -> Any:
        if self.quiet:  # in a worker process, before anything there imports TensorFlow (a no-op where it is imported already)
            from street2shop.console import quiet_tensorflow

            quiet_tensorflow()
        return load_savedmodel(self.model_path)

    def run_inference(self, batch: Sequence[Any], model: Any, inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        def call(images: list[bytes], boxes: np.ndarray | None) -> tuple[np.ndarray, str]:
            vectors, fingerprints = call_savedmodel(model, images, boxes)
            return vectors, fingerprints[0]

        results = []
        for example, answer in zip(batch, embed_isolating(list(batch), call)):
            if isinstance(answer, str):
                results.append(PredictionResult(example, Rejected(answer), None))
            else:
                results.append(PredictionResult(example, answer[0], answer[1]))
        return results

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(len(data) for data, _ in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS


def _route(keyed: tuple[Row, PredictionResult]) -> Iterator[Any]:
    """Inference → ``(row, vector, fingerprint)``, or the dead letter for a rejected image."""
    row, result = keyed
    if isinstance(result.inference, Rejected):
        yield beam.pvalue.TaggedOutput(DEAD, (row, result.inference.reason, "model"))
    else:
        yield row, np.asarray(result.inference, np.float32), str(result.model_id)


def _failed_batch(failure: tuple[Sequence[tuple[Row, Any]], tuple[type, str, Any]]) -> Iterator[tuple[Row, str, str]]:
    """A batch RunInference's exception handling caught (``(batch, (type, repr, traceback))``) → a dead letter per row."""
    batch, (kind, text, _) = failure
    for row, _ in batch:
        yield row, f"inference failed: {text}", "inference"


# --------------------------------------------------------------------------- writing


def shard_of(row: Row, shard_rows: int) -> tuple[int, int]:
    """The shard a row goes to: its manifest and its block of ``shard_rows`` lines (the same in every process and run)."""
    return row.source, row.line // shard_rows


def shard_name(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]:06d}-{shard[1]:09d}"


class WriteShard(beam.DoFn):
    """``((manifest, block), [("ok", row, vector) | ("dead", row, (reason, stage))])`` → one embeddings folder, rows in manifest order.

    The run's models (a side input: the distinct ``(fingerprint, dimension)``
    of every batch) are recorded as the shard's identity when there is one;
    with two, the shard records them all and no identity, and the launcher
    refuses to publish the run.
    """

    def __init__(self, run_dir: str, version: int | None, milvus: tuple[str, str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.version = version
        self.milvus = milvus  # (uri, name, collection) to upsert the shard's rows into, or None

    def process(self, element: tuple[tuple[int, int], Iterable[tuple[str, Row, Any]]], models: list[tuple[str, int]]) -> Iterator[str]:
        shard, entries = element
        embedded, dead = [], []
        for kind, row, value in entries:
            (embedded if kind == "ok" else dead).append((row, value))
        embedded.sort(key=lambda e: (e[0].source, e[0].line))
        dead.sort(key=lambda e: (e[0].source, e[0].line))
        models = sorted(set(models))
        identity = ModelIdentity(models[0][0], self.version, models[0][1]) if len(models) == 1 else None
        dimension = models[0][1] if len(models) == 1 else 0
        vectors = np.stack([v for _, v in embedded]) if embedded else np.zeros((0, dimension), np.float32)
        extra: dict[str, Any] = {"manifest": shard[0], "block": shard[1], "dead_letter": len(dead),
                                 "references": domain_counts(Item.from_record(row.record) for row, _ in embedded)}
        if len(models) > 1:
            extra["models"] = [fingerprint for fingerprint, _ in models]
        items = [Item.from_record(row.record) for row, _ in embedded]
        if self.milvus is not None:
            extra["categories"] = sorted({item.category for item in items if item.category})
        files = encode_embeddings(vectors, items, identity, {row.record.image_path: reason for row, (reason, _) in dead}, **extra)
        letters = "".join(json.dumps({**Item.from_record(row.record).to_dict(), "reason": reason, "stage": stage}, ensure_ascii=False)
                          + "\n" for row, (reason, stage) in dead)
        folder = FileSystems.join(self.run_dir, shard_name(shard))
        for name, data in [(DEAD_LETTER_FILE, letters.encode("utf-8")), *files.items()]:  # embed.json last
            write_file(FileSystems.join(folder, name), data)
        if self.milvus is not None and items and identity is not None:
            from street2shop.index.base import check_embeddings
            from street2shop.index.milvus import MilvusTarget, connect
            from street2shop.index.milvus_write import ROW_SHIFT, write_entities

            target = MilvusTarget(self.milvus[0], self.milvus[1])
            write_entities(connect(target), target, self.milvus[2], check_embeddings(vectors, items, vectors.shape[1]), items,
                           [row.source << ROW_SHIFT | row.line for row, _ in embedded], upsert=True)
        yield folder


# --------------------------------------------------------------------------- the pipeline


class EmbedCatalogue(beam.PTransform):
    """Manifest paths → the sharded embeddings folder of one run (see the module doc); returns the shard folders written.

    Args:
        run_dir: str. The run's folder (``OUT/run-...``); shards go under it.
        model_handler: the :class:`SavedModelHandler` (or one like it).
        split: str. Only shop photos of these comma-separated splits (all if empty).
        domains: str. The photos to embed as references: ``shop``, ``street`` or ``shop,street``.
        reference_splits: str. With ``street``: the street photos of these comma-separated splits.
        shard_rows: int. Manifest lines per output shard (each an embeddings folder).
        crop_to_box, max_pixels, decode_check: as for ``street2shop embed``.
        milvus: ``(uri, name, collection)``: also upsert each shard's rows into that Milvus collection.
    """

    def __init__(self, run_dir: str, model_handler: SavedModelHandler, *, split: str = "", domains: str = "shop",
                 reference_splits: str = DEFAULT_REFERENCE_SPLITS, shard_rows: int = 100_000,
                 crop_to_box: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS, decode_check: bool = False,
                 milvus: tuple[str, str, str] | None = None) -> None:
        super().__init__()
        check_positive_int("shard_rows", shard_rows)
        self.run_dir = run_dir
        self.model_handler = model_handler
        self.split = split
        self.domains = reference_domains(domains)
        self.reference_splits = reference_splits
        self.shard_rows = shard_rows
        self.checks = {"crop_to_box": crop_to_box, "max_pixels": max_pixels, "decode_check": decode_check}
        self.milvus = milvus

    def expand(self, manifests: beam.PCollection) -> beam.PCollection:
        split, domains, reference_splits, shard_rows = self.split, self.domains, self.reference_splits, self.shard_rows
        rows = (
            manifests
            | "Rows" >> beam.FlatMap(read_manifest_file)
            | "Catalogue" >> beam.Filter(lambda row: is_catalogue(row.record, split, domains=domains, reference_splits=reference_splits))
            | "Spread" >> beam.Reshuffle()
        )
        read = rows | "ReadAndCheck" >> beam.ParDo(ReadAndCheck(**self.checks)).with_outputs(DEAD, main="images")
        inferred, failed = read.images | "Embed" >> RunInference(KeyedModelHandler(self.model_handler)).with_exception_handling()
        routed = inferred | "Route" >> beam.FlatMap(_route).with_outputs(DEAD, main="vectors")
        dead = (
            (read[DEAD], routed[DEAD], failed.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch))
            | "DeadLetter" >> beam.Flatten()
        )
        models = (
            routed.vectors
            | "Model" >> beam.Map(lambda e: (e[2], int(e[1].shape[0])))
            | "Models" >> beam.Distinct()
        )
        return (
            (
                routed.vectors | "KeyVectors" >> beam.Map(lambda e: (shard_of(e[0], shard_rows), ("ok", e[0], e[1]))),
                dead | "KeyDead" >> beam.Map(lambda e: (shard_of(e[0], shard_rows), ("dead", e[0], (e[1], e[2])))),
            )
            | "Union" >> beam.Flatten()
            | "Shards" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteShard(self.run_dir, self.model_handler.version, self.milvus),
                                    beam.pvalue.AsList(models))
        )


# --------------------------------------------------------------------------- the launcher


@dataclasses.dataclass
class BeamEmbedResult:
    """What :func:`beam_embed` published."""

    out: str
    run: str
    shards: list[str]
    embedded: int
    dead_letter: int
    identity: ModelIdentity
    replaced: str | None
    seconds: float
    references: dict[str, int] = dataclasses.field(default_factory=lambda: {"shop": 0, "street": 0})  # embedded, by domain
    milvus: dict[str, Any] | None = None  # with --to-milvus: the index, version, collection and count published


def pipeline_options(runner: str = "DirectRunner", args: Sequence[str] = ()) -> PipelineOptions:
    """Beam's options from the command line's leftovers; an option no Beam options class knows is refused (a typo)."""
    options = PipelineOptions(["--runner", runner, *args])
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):  # Beam's parser prints its whole usage, then exits
            known = options.get_all_options()
            everything = options.get_all_options(retain_unknown_options=True)
    except SystemExit:
        said = [line for line in complaint.getvalue().splitlines() if "error:" in line]
        raise ConfigError(f"a Beam pipeline option has a bad value: {said[-1].split('error:', 1)[1].strip() if said else 'see Beam'}. "
                          f"Received: {' '.join(args)}") from None
    unknown = sorted(set(everything) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join('--' + u for u in unknown)}: neither beam-embed's nor Beam's pipeline options "
            f"(see `street2shop beam-embed --help` and Beam's PipelineOptions). Received: {' '.join(args)}"
        )
    direct = options.view_as(DirectOptions)
    if direct.direct_num_workers != 1 and direct.direct_running_mode == "in_memory":
        raise ConfigError(
            f"--direct_num_workers {direct.direct_num_workers} runs in one process unless --direct_running_mode is "
            f"multi_processing (worker processes) or multi_threading. Received: --direct_running_mode in_memory"
        )
    return options


def make_runner(options: PipelineOptions) -> Any:
    """The runner: for ``DirectRunner``, Beam's FnApiRunner itself (DirectRunner would try Prism first, which downloads a binary)."""
    name = options.view_as(StandardOptions).runner or "DirectRunner"
    if name in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return name


def resolve_model(model: str) -> str:
    """The version folder to load: a local export base's newest version (or the version folder given); a remote path must be a version folder."""
    if not is_remote(model):
        version_dir = contract.resolve_export(model)
        contract.read_card(version_dir)  # a street2shop export, with its card
        return str(version_dir.resolve())
    if not FileSystems.exists(FileSystems.join(model, contract.SAVED_MODEL_FILE)):
        raise ModelError(f"no {contract.SAVED_MODEL_FILE} in {model}: give the version folder of an export "
                         f"(like gs://bucket/exports/street2shop/3). Received: {model}")
    return model


def previous_output(out: str) -> dict[str, Any] | None:
    """What ``out`` holds now: None (nothing, or only unfinished runs), or the ``shards.json`` of the output a new run replaces.

    Raises:
        DataError: ``out`` holds something else (the output of ``street2shop
            embed``, or other files): nothing there is replaced.
    """
    pointer = FileSystems.join(out, SHARDS_FILE)
    if FileSystems.exists(pointer):
        try:
            return decode_shards(read_file(pointer), pointer)
        except (OSError, DataError) as e:
            raise DataError(f"{e}: is {out} a beam-embed output? Nothing was written.") from None
    for name in (SUMMARY_FILE, "state.json"):
        if FileSystems.exists(FileSystems.join(out, name)):
            raise DataError(f"{out} holds the output of `street2shop embed` ({name}); beam-embed replaces only its own "
                            f"output. Give another --out. Received: --out {out}")
    if not is_remote(out) and os.path.isdir(out):
        others = sorted(n for n in os.listdir(out) if not n.startswith(("run-", ".")))
        if others:
            raise DataError(f"{out} is not a beam-embed output and not empty (it holds {others[:5]}); give a new or empty "
                            f"folder. Received: --out {out}")
    return None


def read_file(path: str) -> bytes:
    """A whole file, local or on any file system Beam knows."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


def write_file(path: str, data: bytes) -> None:
    """Writes a whole file so that no reader sees half of it: atomically here, as one object on a bucket (written on close)."""
    if is_remote(path):
        with FileSystems.create(path) as handle:
            handle.write(data)
    else:
        write_atomic(path, data)


def publish(out: str, run: str, previous: dict[str, Any] | None, *, source: str,
            model_path: str) -> tuple[list[str], int, int, ModelIdentity, dict[str, int], set[str]]:
    """Checks a finished run's shards and makes it the output: ``shards.json`` names them, the replaced run is deleted.

    ``shards.json`` also counts the images embedded, by domain (``references``: catalogue and customer photos).
    Returns the shards, the counts embedded and in the dead letter, the model, the references by domain, and the
    categories the shards recorded (``--to-milvus``).

    Raises:
        ModelMismatchError: the run's batches came from two models.
        DataError: the run embedded nothing (its dead letters are named).
    """
    run_dir = FileSystems.join(out, run)
    found = [(posixpath.basename(posixpath.dirname(m.path)), json.loads(read_file(m.path)))
             for m in FileSystems.match([FileSystems.join(run_dir, "shard-*", SUMMARY_FILE)])[0].metadata_list]
    found.sort(key=lambda f: (int(f[1]["manifest"]), int(f[1]["block"])))  # manifest order
    shards, records = [name for name, _ in found], [record for _, record in found]
    models = sorted({f for r in records for f in (r.get("models") or ([r["fingerprint"]] if r.get("fingerprint") else []))})
    embedded = sum(int(r["embedded"]) for r in records)
    dead = sum(int(r.get("dead_letter", 0)) for r in records)
    if len(models) > 1:
        raise ModelMismatchError(f"the run's batches were embedded by {len(models)} models ({', '.join(models)}); nothing "
                                 f"was published. Received: {len(models)} models")
    if embedded == 0:
        reasons = [f"{p}: {why}" for r in records for p, why in list(r.get("skipped", {}).items())[:2]][:3]
        raise DataError(
            f"nothing embedded from {source}: {dead} reference images all landed in the dead letter"
            + (f" ({'; '.join(reasons)})" if reasons else " (no photo of the domain(s) and split(s) asked for?)")
            + f"; nothing was published{' and the previous output is kept' if previous else ''}. Received: 0 images embedded"
        )
    identity = ModelIdentity.from_dict(next(r for r in records if r.get("fingerprint")))
    assert identity is not None
    relative = [f"{run}/{s}" for s in shards]
    references = {domain: sum(int(r.get("references", {}).get(domain, 0)) for r in records) for domain in ("shop", "street")}
    data = encode_shards(run, relative, identity, embedded, dead, source=source, model_path=model_path, references=references,
                         dead_letter=f"{run}/shard-*/{DEAD_LETTER_FILE}",
                         created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_file(FileSystems.join(out, SHARDS_FILE), data)
    if previous and previous.get("run") and previous["run"] != run:
        old = FileSystems.join(out, previous["run"])
        if FileSystems.exists(old):
            FileSystems.delete([old])
    return relative, embedded, dead, identity, references, {c for r in records for c in r.get("categories", [])}


class MilvusRun(NamedTuple):
    """The Milvus version a run writes into (``--to-milvus``)."""

    target: Any  # street2shop.index.milvus.MilvusTarget
    version: int
    collection: str
    identity: ModelIdentity  # the model its properties name (the export's card)
    client: Any
    keep: int


def _publish_milvus(milvus: MilvusRun, identity: ModelIdentity, categories: set[str], manifests: int, out: str) -> dict[str, Any]:
    """Makes the run's Milvus version live (``--to-milvus``), once its embeddings are published in ``out``.

    On any failure (another model, Milvus down, an interrupted wait for its index) the version is dropped, the alias keeps
    naming the live one, and the log says how to build the index from the embeddings, which stay as published.
    """
    from street2shop.index.milvus_write import drop_version, publish_version

    try:
        if identity.fingerprint != milvus.identity.fingerprint:
            raise ModelMismatchError(f"the model answered as {identity}, but its card (which named the Milvus collection's model) "
                                     f"says {milvus.identity}; nothing was published to {milvus.target}. Received: fingerprint={identity.fingerprint!r}")
        count = publish_version(milvus.client, milvus.target, milvus.version, milvus.collection,
                                next_row=manifests << 32, categories=categories, keep=milvus.keep)
    except BaseException:
        drop_version(milvus.client, milvus.target, milvus.collection)
        logger.error("the embeddings in %s are published and intact, but not the Milvus version %s: build it from them with "
                     "`street2shop index build %s --backend milvus --uri %s --collection %s`", out, milvus.collection, out,
                     milvus.target.uri, milvus.target.name)
        raise
    return {"index": milvus.target.spec, "version": milvus.version, "collection": milvus.collection, "count": count}


def _milvus_version(spec: str, options: PipelineOptions, model_path: str, index_type: str | None, keep: int | None) -> MilvusRun:
    """The next version of the Milvus index ``spec`` names, made empty for the run's workers to fill."""
    from street2shop.index.milvus import connect, parse_target
    from street2shop.index.milvus_write import DEFAULT_INDEX_TYPE, DEFAULT_KEEP, check_keep, create_version, preflight

    target = parse_target(spec)
    index_type = index_type or DEFAULT_INDEX_TYPE
    keep = check_keep(DEFAULT_KEEP if keep is None else keep)
    direct = options.view_as(DirectOptions)
    if target.is_lite and ((options.view_as(StandardOptions).runner or "DirectRunner") not in LOCAL_RUNNERS
                           or direct.direct_running_mode == "multi_processing"):
        raise ConfigError(f"a Milvus Lite file is held by one process, so --to-milvus {spec} takes the in-process runner only; for worker "
                          f"processes or a cluster give a Milvus server (--to-milvus milvus:http://host:19530#{target.name}). "
                          f"Received: --runner {options.view_as(StandardOptions).runner} --direct_running_mode {direct.direct_running_mode}")
    if is_remote(model_path):
        card = json.loads(read_file(FileSystems.join(model_path, contract.ASSETS_EXTRA, contract.CARD_FILE)))
        identity = contract.card_identity(model_path.rstrip("/"), card)
    else:
        identity = contract.card_identity(model_path)
    client = connect(target)
    preflight(client, target, index_type)
    version, collection = create_version(client, target, identity, index_type=index_type)
    logger.info("the run goes into %s version %d (%s)", target, version, collection)
    return MilvusRun(target, version, collection, identity, client, keep)


def worker_error(error: BaseException) -> Street2ShopError | None:
    """Our own error raised in a worker process, rebuilt from the runner's report of it (a RuntimeError holding the
    worker's traceback); None for an error raised here, or for anything else (a bug keeps its traceback)."""
    if isinstance(error, Street2ShopError) or not isinstance(error, Exception):
        return None
    found = re.findall(r"street2shop\.errors\.(\w+): ([^\n]+)", str(error))
    kind = getattr(errors, found[-1][0], None) if found else None
    if not (isinstance(kind, type) and issubclass(kind, Street2ShopError)):
        return None
    return kind(f"{found[-1][1]} (in a Beam worker)")


def beam_embed(
    manifest: str,
    out: str,
    *,
    model: str,
    split: str = "",
    domains: str = "shop",
    reference_splits: str = DEFAULT_REFERENCE_SPLITS,
    batch_size: int = 32,
    min_batch_size: int | None = None,
    shard_rows: int = 100_000,
    crop_to_box: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_check: bool = False,
    runner: str = "DirectRunner",
    pipeline_args: Sequence[str] = (),
    model_handler: SavedModelHandler | None = None,
    quiet_workers: bool = True,
    to_milvus: str | None = None,
    index_type: str | None = None,
    keep: int | None = None,
) -> BeamEmbedResult:
    """``street2shop beam-embed``: the reference photos of a manifest (or a glob of shards), embedded on Beam into ``out``.

    Args:
        manifest: a manifest CSV or a glob of shards (local, ``gs://``, ``s3://``...).
        out: the output folder: ``shards.json`` and the run's shards.
        model: an export base (local: its newest version) or a version folder.
        split, domains, reference_splits, crop_to_box, max_pixels, decode_check: which images (by default the shop
            photos; ``domains="shop,street"`` adds the street photos of ``reference_splits`` as references of their
            products: :func:`~street2shop.data.records.is_catalogue`), and their checks, as ``street2shop embed``.
            A domain asked for of which nothing was embedded is not an error here (the run learns it only at its
            end, and its other references are good): the log warns, and ``shards.json`` counts the references by domain.
        batch_size, min_batch_size: images per model call (see :class:`SavedModelHandler`).
        shard_rows: manifest lines per output shard (an embeddings folder of up to that many vectors).
        runner, pipeline_args: Beam's runner and its standard options.
        quiet_workers: keep TensorFlow's C++ start-up lines off the workers' stderr (see :class:`SavedModelHandler`).
        model_handler: another handler (tests).
        to_milvus: ``milvus:URI#NAME``: also write the run into the next version of that Milvus index (see the module doc).
        index_type, keep: that version's vector index, and the versions kept (None: the defaults of
            :func:`street2shop.index.milvus_write.build_milvus`).

    Raises:
        ConfigError: an unknown Beam option, a bad setting.
        DataError: no manifest, ``out`` holds something else, nothing embedded.
        ModelError: no export at ``model``.
        ModelMismatchError: the run's batches came from two models.
    """
    options = pipeline_options(runner, pipeline_args)
    manifests = match_manifests(manifest)
    model_path = resolve_model(model)
    out = out.rstrip("/") if is_remote(out) else os.path.abspath(out)
    previous = previous_output(out)
    handler = model_handler or SavedModelHandler(model_path, batch_size=batch_size, min_batch_size=min_batch_size, quiet=quiet_workers)
    run = f"run-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    run_dir = FileSystems.join(out, run)
    kinds = reference_domains(domains)
    milvus = _milvus_version(to_milvus, options, model_path, index_type, keep) if to_milvus else None
    start = time.perf_counter()
    try:
        transform = EmbedCatalogue(run_dir, handler, split=split, domains=",".join(kinds), reference_splits=reference_splits,
                                   shard_rows=shard_rows, crop_to_box=crop_to_box, max_pixels=max_pixels, decode_check=decode_check,
                                   milvus=(milvus.target.uri, milvus.target.name, milvus.collection) if milvus else None)
        chosen = [f"{domain} photos of split(s) {sorted(catalogue_splits(splits)) or 'all'}"
                  for domain, splits in (("shop", split), ("street", reference_splits)) if domain in kinds]
        logger.info("embedding %s (%d manifest file(s); %s) with %s into %s on %s", manifest, len(manifests), " and ".join(chosen),
                    model_path, run_dir, options.view_as(StandardOptions).runner)
        pipeline = beam.Pipeline(runner=make_runner(options), options=options)
        _ = pipeline | "Manifests" >> beam.Create(list(enumerate(manifests))) | "Embed" >> transform
        result = pipeline.run()
        result.wait_until_finish()
        shards, embedded, dead, identity, references, categories = publish(out, run, previous, source=manifest, model_path=model_path)
    except BaseException as e:
        if FileSystems.exists(run_dir):
            FileSystems.delete([run_dir])
        if milvus is not None:
            from street2shop.index.milvus_write import drop_version

            drop_version(milvus.client, milvus.target, milvus.collection)
        ours = worker_error(e)
        if ours is not None:
            raise ours from e
        raise
    # The embeddings are published from here on: a failure of the Milvus step drops its version and keeps them.
    published = _publish_milvus(milvus, identity, categories, len(manifests), out) if milvus is not None else None
    seconds = time.perf_counter() - start
    log = logger.warning if dead else logger.info
    log("embedded %d images into %d shards of %s (%s); %d in the dead letter (%s)", embedded, len(shards), out, identity,
        dead, FileSystems.join(run_dir, "shard-*", DEAD_LETTER_FILE))
    for domain, splits, flag in (("shop", split, "--split"), ("street", reference_splits, "--reference-splits")):
        if domain in kinds and not references[domain]:
            logger.warning("no %s photo of split(s) %s of %s was embedded: the output holds none (%s %r)", domain,
                           sorted(catalogue_splits(splits)) or "any", manifest, flag, splits)
    return BeamEmbedResult(out, run, shards, embedded, dead, identity, previous.get("run") if previous else None, seconds, references,
                           published)
