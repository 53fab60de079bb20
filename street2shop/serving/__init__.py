"""Talking to TensorFlow Serving over gRPC.

- :mod:`street2shop.serving.client`: :class:`~street2shop.serving.client.EmbeddingClient`,
  the client for a TF Serving that serves the exported embedding SavedModel,
  over :mod:`~street2shop.serving.transport` (the channel, gRPC's retries,
  errors), :mod:`~street2shop.serving.signatures` (the served signatures
  against the contract) and :mod:`~street2shop.serving.codec` (requests and
  answers).
- :mod:`street2shop.serving.server`: :class:`~street2shop.serving.server.StandInServer`,
  a small local STAND-IN that speaks the same gRPC API, for development and
  tests. It is not a replacement for TF Serving (see ``serving/README.md``).

Nothing is imported here, so ``import street2shop.serving`` stays cheap.
"""
