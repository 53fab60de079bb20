"""The search API's shapes: the searches it takes, the answers it gives, its refusals (pydantic; no FastAPI).

A search arrives in one of two bodies, each a model here that the service
validates it with: :class:`MultipartSearch` (a file upload, what a browser
form sends) and :class:`JsonSearch` (the photo in base64, TF Serving's REST
convention for bytes). Both give the same four values: ``image`` (the photo's
bytes), ``k``, ``box`` (a :class:`~street2shop.data.image.Box` or None) and
``category``. The OpenAPI page's request bodies are generated from these same
models (:func:`request_schemas`), so what the page documents is what the
parser accepts. Bad values are refused with the messages written here
(:func:`validate_search`): 400 for a photo that cannot be read, 422 for a bad
parameter, an unknown field included.

The answers (:class:`SearchResponse`, :class:`ErrorResponse`) are what the
service returns and what :class:`~street2shop.service.client.SearchClient`
reads them into.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from street2shop.data.image import Box
from street2shop.errors import Street2ShopError

MAX_K = 100
DEFAULT_K = 20
PHOTO_ERROR = "photo"  # a pydantic error type of ours: the photo cannot be used (400)
PARAMETER_ERROR = "parameter"  # ... a parameter is bad (422)


class ServiceError(Street2ShopError):
    """An answer of the search API other than 200: the status, a one-line detail, and ``Retry-After`` if any.

    Raised by the service to answer with, and by the client for an answer it received.
    """

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else {}


def _refuse(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, "{message}", {"message": message})


# --------------------------------------------------------------------------- what each value accepts


def _k(value: Any) -> int:
    if value is None or value == "":
        return DEFAULT_K
    if isinstance(value, int) and not isinstance(value, bool):
        k = value
    elif isinstance(value, str) and value.strip().isdigit():
        k = int(value)
    else:
        raise _refuse(PARAMETER_ERROR, f"k must be a whole number from 1 to {MAX_K}. Received: k={value!r}")
    if not 1 <= k <= MAX_K:
        raise _refuse(PARAMETER_ERROR, f"k must be from 1 to {MAX_K}. Received: k={k}")
    return k


def _box(value: Any) -> Box | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            return Box.parse(value)
        if isinstance(value, dict) and set(value) == {"left", "top", "width", "height"}:
            return Box(*(float(value[key]) for key in ("left", "top", "width", "height")))
        if isinstance(value, list) and len(value) == 4:
            return Box(*(float(v) for v in value))
    except (ValueError, TypeError) as e:
        raise _refuse(PARAMETER_ERROR, f"box must be [left, top, width, height] in pixels of the photo, width and height > 0: {e}") from None
    raise _refuse(PARAMETER_ERROR, f"box must be [left, top, width, height] in pixels of the photo. Received: box={value!r}")


def _category(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _refuse(PARAMETER_ERROR, f"category must be a string. Received: {value!r}")
    return value


MULTIPART_NEEDS_IMAGE = "a multipart search needs the photo as a file field named 'image'"
JSON_NEEDS_IMAGE = 'a JSON search needs {"image": {"b64": "<the photo, base64>"}}'


def _uploaded(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):  # the service passes a file's bytes, and a text field as text
        return bytes(value)
    raise _refuse(PARAMETER_ERROR, MULTIPART_NEEDS_IMAGE)


def _base64_image(value: Any) -> bytes:
    if not isinstance(value, dict) or not isinstance(value.get("b64"), str):
        raise _refuse(PARAMETER_ERROR, JSON_NEEDS_IMAGE)
    if set(value) != {"b64"}:
        raise _refuse(PARAMETER_ERROR, f"image takes only b64. Received: keys {sorted(value)}")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(PHOTO_ERROR, "image.b64 is not valid base64") from None


# --------------------------------------------------------------------------- the two bodies of a search


class Base64Image(BaseModel):
    """The photo's bytes in base64 (TF Serving's REST convention for bytes)."""

    b64: str = Field(description="the photo (JPEG, PNG, GIF or BMP), base64-encoded")


class BoxObject(BaseModel):
    """A box as an object, in pixels of the photo."""

    left: float = Field(ge=0)
    top: float = Field(ge=0)
    width: float = Field(gt=0)
    height: float = Field(gt=0)


BoxText = Annotated[str, Field(description="LEFT,TOP,WIDTH,HEIGHT in pixels of the photo", examples=["30,89,124,71"])]
BoxList = Annotated[list[float], Field(min_length=4, max_length=4, description="[left, top, width, height] in pixels of the photo")]
BOX_HELP = ("the product's box, in pixels of the photo as stored (EXIF rotation is not applied); it must lie inside the "
            "photo (422 otherwise, with the part that does). Without it, the whole photo is searched")
K = Annotated[int, Field(ge=1, le=MAX_K, description="how many products to answer"), BeforeValidator(_k)]
CATEGORY_HELP = "search only this category of the catalogue (422, listing the index's categories, if it has no such one)"


class _Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    needs_image: ClassVar[str]  # what a search without a usable image field is told

    image: bytes
    k: int
    box: Box | None
    category: str | None


class MultipartSearch(_Search):
    """A search as ``multipart/form-data``: the photo as a file, the other values as text fields."""

    needs_image = MULTIPART_NEEDS_IMAGE

    image: Annotated[bytes, PlainValidator(_uploaded, json_schema_input_type=bytes),
                     Field(description="the photo: a JPEG, PNG, GIF or BMP file")]
    k: K = DEFAULT_K
    # A form field is there or not (no null): the schema says text.
    box: Annotated[Box | None, PlainValidator(_box, json_schema_input_type=BoxText), Field(description="LEFT,TOP,WIDTH,HEIGHT: " + BOX_HELP)] = None
    category: Annotated[str | None, Field(description=CATEGORY_HELP), BeforeValidator(_category, json_schema_input_type=str)] = None


class JsonSearch(_Search):
    """A search as ``application/json``: the photo in base64."""

    needs_image = JSON_NEEDS_IMAGE

    image: Annotated[bytes, PlainValidator(_base64_image, json_schema_input_type=Base64Image),
                     Field(description="the photo, base64-encoded")]
    k: K = DEFAULT_K
    box: Annotated[Box | None, PlainValidator(_box, json_schema_input_type=BoxList | BoxObject | BoxText | None),
                   Field(description=BOX_HELP)] = None
    category: Annotated[str | None, Field(description=CATEGORY_HELP), BeforeValidator(_category)] = None


SEARCH_BODIES: dict[str, type[_Search]] = {"multipart/form-data": MultipartSearch, "application/json": JsonSearch}


def validate_search(model: type[_Search], values: Any) -> _Search:
    """``values`` (a form's fields, or a JSON body) checked by ``model``; a ServiceError (400 or 422) saying all that is wrong."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        problems, status = [], 422
        for error in e.errors(include_url=False):
            kind, where = error["type"], ".".join(str(part) for part in error["loc"])
            if kind in (PHOTO_ERROR, PARAMETER_ERROR):
                problems.append(error["ctx"]["message"])
                status = 400 if kind == PHOTO_ERROR else status
            elif kind == "extra_forbidden":
                problems.append(f"{where!r} is not a search parameter; a search takes {', '.join(model.model_fields)}")
            elif where in ("", "image"):  # not an object, or no image field
                problems.append(model.needs_image)
            else:
                problems.append(f"{where}: {error['msg']}")
        raise ServiceError(status, "; ".join(dict.fromkeys(problems))) from None


def request_schemas(ref_template: str = "#/components/schemas/{model}") -> tuple[dict[str, Any], dict[str, Any]]:
    """``(request body, schemas)`` for OpenAPI: ``POST /v1/search``'s body, generated from the models above, and the named schemas it refers to."""
    from pydantic.json_schema import models_json_schema

    refs, definitions = models_json_schema([(model, "validation") for model in SEARCH_BODIES.values()], ref_template=ref_template)
    content = {media: {"schema": refs[(model, "validation")]} for media, model in SEARCH_BODIES.items()}
    return {"required": True, "content": content}, _reachable(content, definitions.get("$defs", {}), ref_template)


def _reachable(root: Any, definitions: dict[str, Any], ref_template: str) -> dict[str, Any]:
    """The definitions ``root`` refers to, directly or through one another."""
    prefix = ref_template.split("{model}")[0]
    found: dict[str, Any] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(prefix) and ref[len(prefix):] not in found:
                name = ref[len(prefix):]
                found[name] = definitions[name]
                stack.append(definitions[name])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


# --------------------------------------------------------------------------- answers


class Matched(BaseModel):
    """The reference image the photo matched best: the product's rank and similarity are this image's."""

    image_id: str = Field(description="the matched image's stable id")
    domain: Literal["shop", "street"] = Field(description="shop: a catalogue photo; street: one of the product's labelled customer photos, "
                                                          "indexed as a reference (the service does not serve customer photos)")


class Hit(BaseModel):
    rank: int = Field(description="1 for the best product")
    product_id: str
    similarity: float = Field(description="cosine similarity of the photo and the product's best reference image (matched), in [-1, 1]")
    category: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="the catalogue manifest's other columns (product_name, ...), "
                                                                     "of the product's catalogue photo (of the customer photo matched "
                                                                     "when the product has none)")
    image_id: str | None = Field(description="the stable id of the product's catalogue photo to show: the matched image when it is a "
                                             "catalogue photo, else the product's first one; null when the index holds only customer "
                                             "photos of the product")
    image_url: str | None = Field(description="where the service serves that catalogue photo (null with image_id)")
    matched: Matched = Field(description="the image the photo matched best: a catalogue photo or a customer photo")


class Timings(BaseModel):
    embed_ms: float
    search_ms: float
    total_ms: float


class SearchResponse(BaseModel):
    """The products found, best first, and what found them."""

    results: list[Hit]
    index_version: int | None = Field(description="the index version that answered")
    model_version: int | None = Field(description="the model version that embedded the photo")
    model_fingerprint: str | None = Field(description="the weights fingerprint of that model")
    timings: Timings


class ErrorResponse(BaseModel):
    """Why the request was not answered (every status but 200)."""

    detail: str
