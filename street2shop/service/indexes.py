"""The index the service answers with: the newest complete version under an index base, swapped live.

:class:`IndexWatcher` polls the base every few seconds (a Milvus index,
``milvus:URI#NAME``: the collection its alias names, whichever way the alias
moves; an update in place is read again on each poll). A new version is
loaded beside the current one (memory-mapped, so this is cheap) and checked
against the embedder: the same dimension and the same model (weights
fingerprint). If it fits, it becomes current with one reference assignment; a
request keeps the index object it started with, so it finishes on it and
nothing in flight fails. If it does not fit, the old version keeps serving and
the refusal is logged, counted and shown on ``/readyz``; a refused version is
tried again when the embedder's model changes (TF Serving loads a new version
of the model by itself, and the index built for it may already be waiting).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from street2shop.contract import ModelIdentity
from street2shop.errors import ModelMismatchError, Street2ShopError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Refusal:
    version: int
    reason: str
    model: str  # the embedder's model fingerprint when it was refused ("" if unknown)
    at: float


class IndexWatcher:
    """Keeps the newest complete index version that fits the embedder.

    Args:
        base: str or path. The index base (``INDEX_BASE/<n>/``), or a Milvus index (``milvus:URI#NAME``).
        identity: callable returning the embedder's current model (may raise
            if the embedder cannot tell right now).
        poll_seconds: float. How often :meth:`start`'s thread looks for a new version.
        on_change: callable(event, details) for metrics: ``"loaded"`` or ``"refused"``.
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        identity: Callable[[], ModelIdentity],
        *,
        poll_seconds: float = 2.0,
        on_change: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        from street2shop.index import index_source

        self.source = index_source(base)
        self.base = self.source.describe()
        self.identity = identity
        self.poll_seconds = float(poll_seconds)
        self.on_change = on_change or (lambda event, details: None)
        self.current: Any = None  # the SearchIndex requests use (read once per request)
        self.refused: dict[int, Refusal] = {}
        self.last_error: str = ""
        self.unreachable = False  # the last look found the index's store (Milvus) not answering: searches fail too
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Looks once for a newer version and swaps to it if it fits; True if it swapped."""
        with self._lock:
            current = self.current.version if self.current is not None else 0
            try:
                newer = dict(self.source.candidates(current))
                if not newer and self.current is not None:
                    self.source.refresh(self.current)  # a Milvus index updated in place
            except OSError as e:
                self.last_error = f"cannot list {self.base}: {e}"
                return False
            except Street2ShopError as e:  # Milvus does not answer, or has no such index
                self.last_error, self.unreachable = str(e), True
                return False
            self.unreachable = False
            if not newer:
                self.last_error = "" if self.current is not None else self.source.waiting()
                return False
            try:
                model = self.identity()
            except Street2ShopError as e:
                self.last_error = f"cannot ask the embedder which model it serves: {e}"
                return False
            for version in newer:  # the newest that fits
                earlier = self.refused.get(version)
                if earlier is not None and earlier.model == model.fingerprint:
                    continue
                try:
                    index = self.source.load(newer[version])
                    index.check_model(model, "the service's embedder")
                except ModelMismatchError:  # the refused thing is the index: name its model as the one received
                    made = index.identity
                    reason = (f"index version {version} holds vectors of {made} ({made.dimension} dimensions), but the service embeds with {model} "
                              f"({model.dimension} dimensions); it waits for an index of the served model (or for the server to serve the "
                              f"index's). Received: fingerprint={made.fingerprint!r}")
                except (Street2ShopError, OSError) as e:
                    reason = str(e)
                else:
                    reason = ""
                if reason:
                    self.refused[version] = Refusal(version, reason, model.fingerprint, time.time())
                    logger.error("index version %d under %s refused, still serving version %s: %s", version, self.base, current or "none", reason)
                    self.on_change("refused", {"version": version, "reason": reason})
                    continue
                self.current = index
                self.refused.pop(version, None)
                self.last_error = ""
                logger.info("serving index version %d (%d items, %s) from %s", version, len(index), index.identity, newer[version])
                self.on_change("loaded", {"version": version, "items": len(index)})
                return True
            return False

    def start(self) -> None:
        """Checks now, then every ``poll_seconds`` in a background thread until :meth:`stop`."""
        self.check()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="index-watcher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive one bad poll
                logger.exception("index watcher: a check failed; trying again in %.1f s", self.poll_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def status(self) -> dict[str, Any]:
        index = self.current
        return {
            "base": self.base,
            "version": index.version if index is not None else None,
            "items": len(index) if index is not None else 0,
            "model": index.identity.to_dict() if index is not None and index.identity else None,
            "refused": {str(v): r.reason for v, r in sorted(self.refused.items())},
            "error": self.last_error,
        }
