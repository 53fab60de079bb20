"""Embed a whole catalogue, resumably, with a local SavedModel or over gRPC.

``embed_catalog(records, embedder, out_dir)`` writes, under ``out_dir``:

- ``chunks/chunk-NNNNNN.npz``: finished chunks (embeddings, rows, skipped);
  a killed run started again continues after the last finished chunk and
  never re-embeds what is done;
- ``embeddings.npy`` (float32 ``[N, D]``) and ``items.jsonl`` (one line per
  row: product_id, image_path, category), the item table the index uses;
- ``embed.json``: the model fingerprint and dimension, counts, and the images
  skipped with the reason.

An embedder is anything with ``embed(images, boxes=None) -> [N, D]``,
``dimension`` and ``fingerprint``: :class:`street2shop.export.LocalEmbedder`
or :class:`street2shop.serving.client.EmbeddingClient`.
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
from typing import Any, Protocol

import numpy as np
from PIL import Image

from street2shop.data.records import Record
from street2shop.errors import BadRequestError, DataError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class Embedder(Protocol):
    dimension: int

    def embed(self, images: Sequence[bytes], boxes: np.ndarray | None = None) -> np.ndarray: ...


@dataclasses.dataclass
class EmbedResult:
    """What :func:`embed_catalog` produced."""

    embeddings: np.ndarray
    items: list[dict[str, Any]]
    skipped: dict[str, str]
    out_dir: Path
    resumed_chunks: int


def _records_digest(records: Sequence[Record], chunk_size: int) -> str:
    digest = hashlib.sha256(str(chunk_size).encode())
    for r in records:
        digest.update(f"{r.image_path}\0{r.product_id}\0{r.box}\n".encode())
    return digest.hexdigest()[:16]


def normalized_box(record: Record) -> list[float] | None:
    """A record's pixel box as normalised ``[ymin, xmin, ymax, xmax]`` (reads the image size)."""
    if record.box is None:
        return None
    with Image.open(record.image_path) as im:
        w, h = im.size
    left, top, width, height = record.box.as_ltwh()
    return [top / h, left / w, (top + height) / h, (left + width) / w]


def embed_records(
    records: Sequence[Record], embedder: Embedder, *, batch_size: int = 32, crop_to_box: bool = True, progress: bool = False
) -> tuple[list[int], np.ndarray, dict[str, str]]:
    """Embeds records in batches, skipping bad images (not persisted; see embed_catalog for that).

    Returns:
        ``(rows, vectors, skipped)``: indices of the embedded records, their
        float32 ``[len(rows), D]`` embeddings, and image path → reason for
        each skipped one.
    """
    bar = None
    if progress:
        import keras

        bar = keras.utils.Progbar(len(records), unit_name="image")
    rows: list[int] = []
    vectors = [np.zeros((0, embedder.dimension), np.float32)]
    skipped: dict[str, str] = {}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        batch_rows, batch_vectors, batch_skipped = _embed_batch(embedder, batch, crop_to_box)
        rows += [start + r for r in batch_rows]
        vectors.append(batch_vectors)
        skipped.update(batch_skipped)
        if bar is not None:
            bar.add(len(batch))
    if skipped:
        logger.warning("skipped %d unreadable images (%s%s)", len(skipped), "; ".join(list(skipped)[:3]), " ..." if len(skipped) > 3 else "")
    return rows, np.concatenate(vectors), skipped


def _load(record: Record, use_box: bool) -> tuple[bytes, list[float] | None]:
    data = Path(record.image_path).read_bytes()
    return data, (normalized_box(record) if use_box else None)


def _embed_batch(embedder: Embedder, records: Sequence[Record], crop_to_box: bool) -> tuple[list[int], np.ndarray, dict[str, str]]:
    """Embeds records; a bad image is skipped (found by retrying one by one)."""
    loaded: list[tuple[int, bytes, list[float] | None]] = []
    skipped: dict[str, str] = {}
    for i, r in enumerate(records):
        try:
            data, box = _load(r, crop_to_box)
        except (OSError, Image.DecompressionBombError) as e:
            skipped[r.image_path] = f"cannot read: {getattr(e, 'strerror', None) or e}"
            continue
        loaded.append((i, data, box))

    def run(items):
        images = [data for _, data, _ in items]
        use_boxes = any(box is not None for _, _, box in items)
        boxes = np.array([box if box is not None else [0, 0, 1, 1] for _, _, box in items], np.float32) if use_boxes else None
        return embedder.embed(images, boxes)

    if not loaded:
        return [], np.zeros((0, embedder.dimension), np.float32), skipped
    try:
        vectors = run(loaded)
        return [i for i, _, _ in loaded], np.asarray(vectors, np.float32), skipped
    except BadRequestError:
        pass
    rows, vectors = [], []
    for item in loaded:
        try:
            vectors.append(run([item])[0])
            rows.append(item[0])
        except BadRequestError as e:
            skipped[records[item[0]].image_path] = str(e)
    return rows, np.asarray(vectors, np.float32).reshape(len(rows), embedder.dimension), skipped


def embed_catalog(
    records: Sequence[Record],
    embedder: Embedder,
    out_dir: str | os.PathLike[str],
    *,
    chunk_size: int = 256,
    batch_size: int = 32,
    in_flight: int = 2,
    crop_to_box: bool = True,
    progress: bool = False,
    fingerprint: str | None = None,
) -> EmbedResult:
    """Embeds ``records`` in chunks; resumes a killed run where it stopped.

    Args:
        records: sequence of Record. The catalogue images.
        embedder: LocalEmbedder or EmbeddingClient.
        out_dir: str or path. Output folder (see module doc).
        chunk_size: int. Images per saved chunk (the unit of resumption).
        batch_size: int. Images per embed call.
        in_flight: int. Embed calls running at once (use 2-8 with a server).
        crop_to_box: bool. Crop images that have a box to it.
        progress: bool. Show a progress bar.
        fingerprint: str or None. The model's fingerprint (from its card);
            defaults to ``embedder.fingerprint`` when it has one.

    Raises:
        DataError: ``out_dir`` holds chunks of another catalogue or model.
        ServingError: the server went away (finished chunks are kept).
    """
    out = Path(out_dir)
    chunks_dir = out / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    if fingerprint is None:
        fingerprint = str(getattr(embedder, "fingerprint", "") or "")
    state = {"format_version": FORMAT_VERSION, "records": _records_digest(records, chunk_size), "fingerprint": fingerprint, "dimension": int(embedder.dimension)}
    state_path = out / "state.json"
    if state_path.is_file():
        try:
            previous = json.loads(state_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {state_path} ({e}); delete {out} to start over") from None
        if previous != state:
            raise DataError(
                f"{out} holds an embedding run of another catalogue or model (state {previous}); "
                f"use another --out or delete it. Received: {state}"
            )
    else:
        _write_atomic(state_path, json.dumps(state))

    n_chunks = -(-len(records) // chunk_size)
    done = {int(p.stem.split("-")[1]) for p in chunks_dir.glob("chunk-*.npz")}
    todo = [c for c in range(n_chunks) if c not in done]
    if done:
        logger.info("resuming: %d of %d chunks already embedded in %s", len(done), n_chunks, out)
    bar = None
    if progress:
        import keras

        bar = keras.utils.Progbar(len(records), unit_name="image")
        bar.update(sum(min(chunk_size, len(records) - c * chunk_size) for c in done))

    with ThreadPoolExecutor(max_workers=max(1, in_flight)) as pool:
        for c in todo:
            chunk = list(records[c * chunk_size : (c + 1) * chunk_size])
            batches = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
            results = list(pool.map(lambda b: _embed_batch(embedder, b, crop_to_box), batches))
            rows, vectors, skipped = [], [], {}
            for k, (batch_rows, batch_vectors, batch_skipped) in enumerate(results):
                rows += [c * chunk_size + k * batch_size + r for r in batch_rows]
                vectors.append(batch_vectors)
                skipped.update(batch_skipped)
            tmp = chunks_dir / f".chunk-{c:06d}.tmp.npz"
            np.savez(tmp, rows=np.array(rows, np.int64), embeddings=np.concatenate(vectors).astype(np.float32),
                     skipped=np.array(json.dumps(skipped)))
            os.replace(tmp, chunks_dir / f"chunk-{c:06d}.npz")
            if bar is not None:
                bar.add(len(chunk))
    return _assemble(records, out, n_chunks, int(embedder.dimension), fingerprint, len(done))


def _assemble(records: Sequence[Record], out: Path, n_chunks: int, dimension: int, fingerprint: str, resumed: int) -> EmbedResult:
    rows, vectors, skipped = [], [], {}
    for c in range(n_chunks):
        with np.load(out / "chunks" / f"chunk-{c:06d}.npz") as z:
            rows += z["rows"].tolist()
            vectors.append(z["embeddings"])
            skipped.update(json.loads(str(z["skipped"])))
    embeddings = np.concatenate(vectors) if vectors else np.zeros((0, dimension), np.float32)
    items = [{"product_id": records[r].product_id, "image_path": records[r].image_path, "category": records[r].category} for r in rows]
    tmp = out / ".embeddings.tmp.npy"
    np.save(tmp, embeddings)
    os.replace(tmp, out / "embeddings.npy")
    _write_atomic(out / "items.jsonl", "".join(json.dumps(item) + "\n" for item in items))
    summary = {"fingerprint": fingerprint, "dimension": dimension, "embedded": len(items), "skipped": skipped}
    _write_atomic(out / "embed.json", json.dumps(summary, indent=2))
    if skipped:
        shown = "; ".join(f"{p}: {why}" for p, why in list(skipped.items())[:3])
        logger.warning("embedded %d images, skipped %d (%s%s)", len(items), len(skipped), shown, " ..." if len(skipped) > 3 else "")
    else:
        logger.info("embedded %d images into %s", len(items), out)
    return EmbedResult(embeddings, items, skipped, out, resumed)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_embeddings(out_dir: str | os.PathLike[str]) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Reads ``embeddings.npy``, ``items.jsonl`` and ``embed.json`` of a finished run."""
    out = Path(out_dir)
    try:
        embeddings = np.load(out / "embeddings.npy")
        items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((out / "embed.json").read_text())
    except FileNotFoundError as e:
        raise DataError(f"{out} is not a finished embedding run: missing {Path(e.filename).name}") from None
    if len(items) != len(embeddings):
        raise DataError(f"{out}: {len(items)} items but {len(embeddings)} embeddings")
    return embeddings, items, summary


def reset(out_dir: str | os.PathLike[str]) -> None:
    """Deletes an embedding run's chunks and outputs."""
    shutil.rmtree(out_dir, ignore_errors=True)

