"""What a served model says of itself (``GetModelMetadata``), checked against the serving contract.

A signature must take and give the contract's named inputs and outputs
(:data:`street2shop.contract.SIGNATURES`), and the embedding size D must stay
the one the caller expects: from the signature where it is static, and from
every answer.
"""

from __future__ import annotations

import threading
from typing import Any

from street2shop import contract
from street2shop.errors import ModelNotFoundError, SignatureMismatchError


def _described(tensors: Any) -> dict[str, tuple[str, list[int]]]:
    """A signature's inputs or outputs as ``{name: (dtype name, shape)}`` (-1 for a dimension of no static size)."""
    import tensorflow as tf

    def name(dtype: int) -> str:
        try:
            return tf.dtypes.as_dtype(dtype).name
        except TypeError:
            return str(dtype)

    return {key: (name(info.dtype), [int(d.size) for d in info.tensor_shape.dim]) for key, info in tensors.items()}


class ServedSignatures:
    """The served model's signatures (read once from a ``GetModelMetadata`` answer) and its embedding size D.

    Thread-safe. ``where`` names the model and the server in errors.

    Args:
        where: str. E.g. "model 'street2shop' (latest version) at localhost:8500".
        expected_dimension: int or None. The D the caller needs (any other is a SignatureMismatchError).
    """

    def __init__(self, where: str, expected_dimension: int | None = None) -> None:
        self.where = where
        self.expected_dimension = expected_dimension
        self.defs: dict[str, Any] | None = None  # None until a GetModelMetadata answer is read
        self.version: int | None = None  # the version that answered it
        self.dimension: int | None = None  # D, once a signature or an answer told it
        self._checked: set[str] = set()
        self._lock = threading.RLock()

    def read(self, response: Any) -> None:
        """Takes the signatures of a ``GetModelMetadataResponse`` (asked with ``metadata_field=["signature_def"]``)."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        if "signature_def" not in response.metadata:
            raise SignatureMismatchError(
                f"TF Serving returned no signature_def metadata for {self.where}. Received: metadata fields {sorted(response.metadata)}"
            )
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        with self._lock:
            self.defs = dict(signature_map.signature_def)
            if response.model_spec.HasField("version"):
                self.version = int(response.model_spec.version.value)

    def check(self, name: str, expected: contract.Signature) -> None:
        """Checks that signature ``name`` has the inputs and outputs of the contract's ``expected`` (once per name).

        Raises:
            ModelNotFoundError: no such signature.
            SignatureMismatchError: other inputs or outputs, or another D than expected.
        """
        with self._lock:
            if name in self._checked:
                return
            assert self.defs is not None, "read() the metadata first"
            if name not in self.defs:
                served = sorted(s for s in self.defs if not s.startswith("__"))
                raise ModelNotFoundError(f"{self.where} has no signature {name!r}; use one of {served}. Received: signature={name!r}")
            got_inputs, got_outputs = _described(self.defs[name].inputs), _described(self.defs[name].outputs)
            problems = expected.problems({k: (d, len(s)) for k, (d, s) in got_inputs.items()},
                                         {k: (d, len(s)) for k, (d, s) in got_outputs.items()})
            if problems:
                hint = ""
                if contract.FINGERPRINT not in got_outputs and contract.EMBEDDING in got_outputs:
                    hint = " (a model exported by street2shop before 0.2 has no model_fingerprint output: export it again)"
                raise SignatureMismatchError(
                    f"signature {name!r} of {self.where} does not follow the street2shop contract: "
                    f"expected {', '.join(problems)}{hint}. Received: inputs={got_inputs}, outputs={got_outputs}"
                )
            dimension = got_outputs[contract.EMBEDDING][1][1]
            if dimension > 0:
                self.note_dimension(dimension, f"signature {name!r}")
            self._checked.add(name)

    def static_dimension(self, name: str) -> int | None:
        """D as signature ``name`` declares it (None where it is not static or there is no such signature)."""
        with self._lock:
            signature = (self.defs or {}).get(name)
            if signature is None or contract.EMBEDDING not in signature.outputs:
                return None
            dims = [int(d.size) for d in signature.outputs[contract.EMBEDDING].tensor_shape.dim]
            return dims[1] if len(dims) == 2 and dims[1] > 0 else None

    def note_dimension(self, dimension: int, source: str) -> None:
        """Records D as ``source`` told it; SignatureMismatchError if it is not the expected one or changed."""
        if self.expected_dimension is not None and dimension != self.expected_dimension:
            raise SignatureMismatchError(
                f"{self.where} returns embeddings of dimension {dimension} ({source}) but "
                f"expected_dimension={self.expected_dimension}; check that the server runs the model this index or "
                f"catalogue was built with. Received: dimension={dimension}"
            )
        with self._lock:
            if self.dimension is not None and self.dimension != dimension:
                raise SignatureMismatchError(
                    f"{self.where} changed its embedding dimension from {self.dimension} to {dimension} ({source}); "
                    f"a new model version was loaded. Received: dimension={dimension}"
                )
            self.dimension = dimension
