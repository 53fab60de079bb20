"""The few exception types street2shop raises on purpose.

Every expected failure (bad input, bad config, a server that is down) is a
:class:`Street2ShopError`; the command line turns one into a one-line message
and exit code 2. Anything else escaping is a bug.
"""

from __future__ import annotations

import numbers


class Street2ShopError(Exception):
    """Base class: an expected failure with a message meant for a person."""


class DataError(Street2ShopError):
    """A dataset file, record or image is missing or malformed."""


class ConfigError(Street2ShopError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class ModelError(Street2ShopError):
    """A model, checkpoint or SavedModel cannot be built, loaded or exported."""


class ServingError(Street2ShopError):
    """Talking to TF Serving (or the local stand-in) failed."""


class ServerUnavailableError(ServingError):
    """The server could not be reached within the retries allowed."""


class ModelNotFoundError(ServingError):
    """The server does not serve the model, version or signature asked for."""


class SignatureMismatchError(ServingError):
    """The served signature's inputs, outputs or dimension differ from what the client expects."""


class BadRequestError(ServingError):
    """The server rejected the request (an undecodable image, a batch too large)."""


class IndexMismatchError(Street2ShopError):
    """An index was queried or extended in a way that cannot give right answers."""


class ModelMismatchError(IndexMismatchError):
    """Vectors of one model met vectors, an index or a run of another (their weights fingerprints differ).

    Also raised when a server starts answering with another model in the
    middle of a job. A kind of :class:`IndexMismatchError`: either way the
    answers would be meaningless.
    """


class ImageError(DataError):
    """An image cannot be used: empty, not a JPEG/PNG/GIF/BMP file, truncated, too large, or its box misses it."""


def tf_error_text(message: str) -> str:
    """The one informative line of a TensorFlow runtime error message.

    TF wraps the cause in "Graph execution error:", node names and stack
    placeholders; this keeps e.g. "Unknown image file format. One of JPEG, ...".
    """
    noise = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[", "{{")
    lines = [line.strip() for line in str(message).splitlines()]
    useful = [line for line in lines if line and not line.startswith(noise)]
    text = useful[0] if useful else (lines[0] if lines else "")
    return text.split(" [Op:")[0].strip()



def check_positive_int(name: str, value: object, *, minimum: int = 1, allow_none: bool = False,
                       error: type[Street2ShopError] = ConfigError) -> int | None:
    """``value`` as an int if it is a whole number (a numpy integer too; not a bool) of at least ``minimum``.

    The one check of an integer argument (a batch size, a count, a version):
    anything else raises ``error`` (ConfigError by default) naming the
    argument and what it received. With ``allow_none``, None passes (a
    "default" or "latest").
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise error(f"{name} must be {what}{' or None' if allow_none else ''}. Received: {name}={value!r}")
    return int(value)
