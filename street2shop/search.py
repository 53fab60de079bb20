"""Search the catalogue with customer photos: embed each photo, look it up in the index.

:class:`Searcher` holds an index and an embedder of the same model (checked
when it is made, and again on every answer) and turns photos into ranked
products; :func:`search_photos` is ``street2shop search``. A photo that cannot
be read or embedded gets its reason; the others are answered.

A product is answered at its best reference image, which may be one of its
customer photos when the index holds some (``embed --domains shop,street``):
each answer says so (``SearchResult.domain``) and names the product's
catalogue photo to show (:meth:`PhotoResults.catalogue_photo`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from street2shop.contract import ModelIdentity
from street2shop.data.image import Box, read_image_file
from street2shop.errors import ConfigError, ImageError
from street2shop.items import Item

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PhotoResults:
    """The answer for one photo: ranked products (:class:`~street2shop.index.SearchResult`), or why there are none.

    ``catalogue`` maps each answered product to its catalogue photo (the image to show, even when the match was a
    customer photo); a product with customer photos only in the index has none.
    """

    photo: str
    results: list[Any]
    error: str | None = None
    model: ModelIdentity | None = None
    catalogue: dict[str, Item] = dataclasses.field(default_factory=dict)

    def catalogue_photo(self, result: Any) -> Item | None:
        """The catalogue photo of a result's product (None if the index holds only customer photos of it)."""
        return self.catalogue.get(result.product_id)


class Searcher:
    """An index and an embedder of the same model, answering photos.

    Args:
        index: a :class:`~street2shop.index.SearchIndex` that records its model.
        embedder: an :class:`~street2shop.embedders.Embedder`.

    Raises:
        IndexMismatchError / ModelMismatchError: the index records no model, or another one.
    """

    def __init__(self, index: Any, embedder: Any) -> None:
        index.check_model(embedder.identity())
        self.index = index
        self.embedder = embedder

    def search(
        self,
        images: Sequence[bytes],
        boxes: Sequence[Box | None] | None = None,
        *,
        k: int = 20,
        category: str | None = None,
        names: Sequence[str] | None = None,
    ) -> list[PhotoResults]:
        """Ranked products for each encoded photo (cropped to its pixel box, if given)."""
        names = list(names) if names is not None else [f"photo {i}" for i in range(len(images))]
        embedded = self.embedder.embed(images, boxes)
        if embedded.identity is not None:
            self.index.check_model(embedded.identity, "the answers of the embedder")
        out = []
        for i, (name, error) in enumerate(zip(names, embedded.errors)):
            if error is not None:
                out.append(PhotoResults(name, [], error))
            else:
                results = self.index.query(embedded.vectors[i], k=k, category=category)
                shown = self.index.catalogue_photos(r.product_id for r in results)  # the answer's products only
                out.append(PhotoResults(name, results, model=embedded.identity, catalogue=shown))
        return out


def search_photos(
    photos: Sequence[str | os.PathLike[str]],
    *,
    index: str | os.PathLike[str],
    model: str | None = None,
    server: str | None = None,
    model_name: str = "street2shop",
    boxes: Sequence[str] | None = None,
    k: int = 20,
    category: str | None = None,
    batch_size: int = 32,
) -> list[PhotoResults]:
    """``street2shop search``: photo files against an index folder, embedded in process (``model``) or by TF Serving (``server``).

    ``boxes`` are ``"LEFT,TOP,WIDTH,HEIGHT"`` in pixels, one per photo. The
    embedder must use the index's model (refused before any photo is sent).
    """
    from street2shop.embedders import open_embedder
    from street2shop.index import load_index

    parsed: list[Box | None] | None = None
    if boxes:
        if len(boxes) != len(photos):
            raise ConfigError(f"give one --box per photo or none. Received: {len(photos)} photos, {len(boxes)} boxes")
        try:
            parsed = [Box.parse(b) for b in boxes]
        except ValueError as e:
            raise ConfigError(f"bad --box: {e}") from None
    catalogue = load_index(index)
    if catalogue.identity is None:
        catalogue.check_model(None)  # refuses, saying why
    with open_embedder(model, server, model_name=model_name, batch_size=batch_size, expected=catalogue.identity) as embedder:
        searcher = Searcher(catalogue, embedder)
        images, readable, unreadable = [], [], {}
        for i, photo in enumerate(photos):
            try:
                images.append(read_image_file(photo))
                readable.append(i)
            except ImageError as e:
                unreadable[i] = str(e)
        answered = searcher.search(images, [parsed[i] for i in readable] if parsed else None, k=k, category=category,
                                   names=[str(photos[i]) for i in readable])
    by_position = dict(zip(readable, answered))
    return [by_position.get(i) or PhotoResults(str(photo), [], unreadable[i]) for i, photo in enumerate(photos)]
