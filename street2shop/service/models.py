"""The search service's response shapes, for FastAPI's OpenAPI page."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Hit(BaseModel):
    rank: int = Field(description="1 for the best product")
    product_id: str
    similarity: float = Field(description="cosine similarity of the photo and the product's best catalogue image, in [-1, 1]")
    category: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="the catalogue manifest's other columns (product_name, ...)")
    image_id: str = Field(description="the matched catalogue image's stable id")
    image_url: str = Field(description="where the service serves that image")


class Timings(BaseModel):
    embed_ms: float
    search_ms: float
    total_ms: float


class SearchResponse(BaseModel):
    results: list[Hit]
    index_version: int | None = Field(description="the index version that answered")
    model_version: int | None = Field(description="the model version that embedded the photo")
    model_fingerprint: str | None = Field(description="the weights fingerprint of that model")
    timings: Timings


class ErrorResponse(BaseModel):
    detail: str
