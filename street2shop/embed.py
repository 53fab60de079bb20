"""Embed a whole catalogue, resumably, with any :class:`~street2shop.embedders.Embedder`.

``embed_catalog(records, embedder, out_dir)`` writes, under ``out_dir``:

- ``chunks/chunk-NNNNNN.npz``: finished chunks (embeddings, rows, skipped);
  a killed run started again continues after the last finished chunk and
  never re-embeds what is done;
- ``embeddings.npy`` (float32 ``[N, D]``) and ``items.jsonl`` (one line per
  row: product_id, image_path, category, domain, and the record's other
  columns), the item table the index uses;
- ``embed.json``: the model (fingerprint, version, dimension), counts, and
  the images skipped with the reason.

One run holds one model's vectors only. ``state.json`` records the model at
the start (the embedder's :meth:`~street2shop.embedders.Embedder.identity`:
for TF Serving, the model that answers); a run resumed under another model is
refused, and so is a chunk whose answers came from another model (TF Serving
loads a new version by itself, in the middle of a job). Images that cannot be
read or embedded are skipped, counted and listed; the rest go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.console import Progress
from street2shop.contract import ModelIdentity, check_same_model
from street2shop.data.image import read_image_file
from street2shop.data.records import DEFAULT_REFERENCE_SPLITS, Record
from street2shop.embeddings import write_embeddings
from street2shop.errors import DataError, ImageError, ModelMismatchError
from street2shop.fileio import atomic_file, write_atomic
from street2shop.items import Item, domain_counts

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2


@dataclasses.dataclass
class EmbedResult:
    """What :func:`embed_catalog` produced."""

    embeddings: np.ndarray
    items: list[dict[str, Any]]
    skipped: dict[str, str]
    out_dir: Path
    resumed_chunks: int
    identity: ModelIdentity


@dataclasses.dataclass
class RecordEmbeddings:
    """Records embedded in memory: which were (``rows``), their vectors, the skipped ones, the model."""

    rows: list[int]
    vectors: np.ndarray
    skipped: dict[str, str]
    identity: ModelIdentity | None


def _records_digest(records: Sequence[Record], chunk_size: int) -> str:
    digest = hashlib.sha256(str(chunk_size).encode())
    for r in records:
        digest.update(f"{r.image_path}\0{r.product_id}\0{r.box}\n".encode())
    return digest.hexdigest()[:16]


def _embed_batch(embedder: Any, records: Sequence[Record], crop_to_box: bool) -> RecordEmbeddings:
    """Reads and embeds records; an image that cannot be read or embedded is skipped with its reason."""
    skipped: dict[str, str] = {}
    images, kept = [], []
    for i, record in enumerate(records):
        try:
            images.append(read_image_file(record.image_path))
        except ImageError as e:
            skipped[record.image_path] = str(e)
            continue
        kept.append(i)
    boxes = [records[i].box for i in kept] if crop_to_box and any(records[i].box is not None for i in kept) else None
    result = embedder.embed(images, boxes)
    for i, error in zip(kept, result.errors):
        if error is not None:
            skipped[records[i].image_path] = error
    ok = result.ok
    return RecordEmbeddings([i for i, good in zip(kept, ok) if good], result.vectors[ok], skipped, result.identity)


def embed_records(
    records: Sequence[Record], embedder: Any, *, batch_size: int = 32, crop_to_box: bool = True, progress: bool | str = False
) -> RecordEmbeddings:
    """Embeds records in batches, skipping bad images (in memory; :func:`embed_catalog` persists and resumes).

    Returns:
        :class:`RecordEmbeddings`: indices of the embedded records, their
        float32 ``[len(rows), D]`` vectors, image path → reason for each
        skipped one, and the model (every batch's; two models are refused).
    """
    bar = Progress(len(records), "embedding", unit="images", mode=progress)
    rows: list[int] = []
    vectors = [np.zeros((0, embedder.dimension), np.float32)]
    skipped: dict[str, str] = {}
    identity: ModelIdentity | None = None
    for start in range(0, len(records), batch_size):
        batch = _embed_batch(embedder, records[start : start + batch_size], crop_to_box)
        if identity is not None and batch.identity is not None and not identity.same_model(batch.identity):
            raise ModelMismatchError(f"the model changed while embedding: {identity}, then {batch.identity}. Received: two models")
        identity = batch.identity or identity
        rows += [start + r for r in batch.rows]
        vectors.append(batch.vectors)
        skipped.update(batch.skipped)
        bar.add(len(records[start : start + batch_size]))
    bar.close()
    if skipped:
        logger.warning("skipped %d unreadable images (%s%s)", len(skipped), "; ".join(list(skipped)[:3]), " ..." if len(skipped) > 3 else "")
    return RecordEmbeddings(rows, np.concatenate(vectors), skipped, identity)


def embed_catalog(
    records: Sequence[Record],
    embedder: Any,
    out_dir: str | os.PathLike[str],
    *,
    chunk_size: int = 256,
    batch_size: int = 32,
    in_flight: int = 2,
    crop_to_box: bool = True,
    progress: bool | str = False,
) -> EmbedResult:
    """Embeds ``records`` in chunks; resumes a killed run where it stopped.

    Args:
        records: sequence of Record. The catalogue images.
        embedder: an :class:`~street2shop.embedders.Embedder`.
        out_dir: str or path. Output folder (see module doc).
        chunk_size: int. Images per saved chunk (the unit of resumption).
        batch_size: int. Images per embed call.
        in_flight: int. Embed calls running at once (use 2-8 with a server).
        crop_to_box: bool. Crop images that have a box to it.
        progress: bool or a :func:`~street2shop.console.progress_mode` mode. True: a bar on a
            terminal, a log line every 30 s elsewhere.

    Raises:
        DataError: ``out_dir`` holds chunks of another catalogue.
        ModelMismatchError: ``out_dir`` holds vectors of another model, or the
            model changed during the run (finished chunks are kept).
        ServingError: the server went away (finished chunks are kept).
    """
    out = Path(out_dir)
    chunks_dir = out / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    identity = embedder.identity()
    state = {"format_version": FORMAT_VERSION, "records": _records_digest(records, chunk_size),
             "fingerprint": identity.fingerprint, "dimension": int(embedder.dimension)}
    state_path = out / "state.json"
    if state_path.is_file():
        try:
            previous = json.loads(state_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {state_path} ({e}); delete {out} to start over") from None
        if previous.get("fingerprint") != state["fingerprint"] or previous.get("dimension") != state["dimension"]:
            raise ModelMismatchError(
                f"{out} holds an unfinished run of another model ({previous.get('fingerprint')!r}, dimension "
                f"{previous.get('dimension')}); the embedder now uses {identity}. Nothing mixes two models: use another "
                f"--out, or delete {out} to start over. Received: fingerprint={identity.fingerprint!r}"
            )
        if previous != state:
            raise DataError(
                f"{out} holds an embedding run of another catalogue (state {previous}); "
                f"use another --out or delete it. Received: {state}"
            )
    else:
        write_atomic(state_path, json.dumps(state))

    n_chunks = -(-len(records) // chunk_size)
    done = {int(p.stem.split("-")[1]) for p in chunks_dir.glob("chunk-*.npz")}
    todo = [c for c in range(n_chunks) if c not in done]
    if done:
        logger.info("resuming: %d of %d chunks already embedded in %s", len(done), n_chunks, out)
    bar = Progress(len(records), "embedding the catalogue", unit="images", mode=progress,
                   done=sum(min(chunk_size, len(records) - c * chunk_size) for c in done))

    with ThreadPoolExecutor(max_workers=max(1, in_flight)) as pool:
        for c in todo:
            chunk = list(records[c * chunk_size : (c + 1) * chunk_size])
            batches = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
            results = list(pool.map(lambda b: _embed_batch(embedder, b, crop_to_box), batches))
            rows, vectors, skipped = [], [], {}
            for k, batch in enumerate(results):
                check_same_model(identity, batch.identity, f"a chunk of {out} (the server's model changed during the run)")
                rows += [c * chunk_size + k * batch_size + r for r in batch.rows]
                vectors.append(batch.vectors)
                skipped.update(batch.skipped)
            with atomic_file(chunks_dir / f"chunk-{c:06d}.npz", "wb") as handle:
                np.savez(handle, rows=np.array(rows, np.int64), embeddings=np.concatenate(vectors).astype(np.float32),
                         skipped=np.array(json.dumps(skipped)))
            bar.add(len(chunk))
    bar.close()
    return _assemble(records, out, n_chunks, identity, len(done))


def embed_source(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str = "",
    domains: str | Sequence[str] = "shop",
    reference_splits: str = DEFAULT_REFERENCE_SPLITS,
    model: str | None = None,
    server: str | None = None,
    model_name: str = "street2shop",
    batch_size: int = 32,
    chunk_size: int = 256,
    in_flight: int = 2,
    crop_to_box: bool = True,
    progress: bool | str = False,
) -> EmbedResult:
    """``street2shop embed``: the reference photos of a manifest (or a folder of images), embedded into ``out``.

    By default the shop photos (of the comma-separated ``split`` s, or all).
    With ``domains="shop,street"``, the labelled street photos of
    ``reference_splits`` (``train`` by default: evaluation photos stay out)
    too, as references of their products; each row's ``domain`` is in the
    item table. The rows come in manifest order; see
    :func:`~street2shop.data.records.is_catalogue` for the rule.

    Embeds in process with an export (``model``) or through TF Serving
    (``server``); see :func:`embed_catalog` for resuming and the one-model rule.
    """
    from street2shop.data.records import catalogue_records
    from street2shop.embedders import open_embedder

    records = catalogue_records(source, split, domains=domains, reference_splits=reference_splits)
    with open_embedder(model, server, model_name=model_name, batch_size=batch_size) as embedder:
        return embed_catalog(records, embedder, out, chunk_size=chunk_size, batch_size=batch_size, in_flight=in_flight,
                             crop_to_box=crop_to_box, progress=progress)


def _assemble(records: Sequence[Record], out: Path, n_chunks: int, identity: ModelIdentity, resumed: int) -> EmbedResult:
    rows, vectors, skipped = [], [], {}
    for c in range(n_chunks):
        with np.load(out / "chunks" / f"chunk-{c:06d}.npz") as z:
            rows += z["rows"].tolist()
            vectors.append(z["embeddings"])
            skipped.update(json.loads(str(z["skipped"])))
    dimension = int(identity.dimension or 0)
    embeddings = np.concatenate(vectors) if vectors else np.zeros((0, dimension), np.float32)
    items = [Item.from_record(records[r]).to_dict() for r in rows]
    write_embeddings(out, embeddings, items, identity, skipped)
    if skipped:
        shown = "; ".join(f"{p}: {why}" for p, why in list(skipped.items())[:3])
        logger.warning("embedded %d images, skipped %d (%s%s)", len(items), len(skipped), shown, " ..." if len(skipped) > 3 else "")
    else:
        logger.info("embedded %d images into %s", len(items), out)
    counts = domain_counts(items)
    if counts["street"]:
        logger.info("of them %d catalogue photos and %d customer photos (references of %d products)", counts["shop"], counts["street"],
                    len({item["product_id"] for item in items if item.get("domain") == "street"}))
    return EmbedResult(embeddings, items, skipped, out, resumed, identity)


def reset(out_dir: str | os.PathLike[str]) -> None:
    """Deletes an embedding run's chunks and outputs."""
    shutil.rmtree(out_dir, ignore_errors=True)

