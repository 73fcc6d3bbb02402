"""What the API says: response models for the OpenAPI schema, the error-response table, and the JSON errors.

The models document the API; responses are built as plain JSON for speed, so changing a model here does not
change what a route answers (routes.py does).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["Prediction", "Neighbour", "PredictResponse", "Limits", "NeighboursInfo", "ModelInfo", "Status",
           "ErrorBody", "error_responses", "PREDICT_BODY", "http_error"]


class Prediction(BaseModel):
    label: str
    score: float = Field(ge=0, le=1)


class Neighbour(BaseModel):
    index: int = Field(description="the training image's index in the run's training split")
    label: str = Field(description="its label")
    similarity: float = Field(ge=-1, le=1, description="cosine similarity of the penultimate features")
    thumbnail: str | None = Field(None, description="the training image as a PNG data URI, at most 64 px a "
                                                    "side; null when the server cannot read the training images")


class PredictResponse(BaseModel):
    model: str = Field(description="architecture of the served model")
    predictions: list[list[Prediction]] = Field(description="one list per image, in upload order, best first")
    input_notes: list[list[str]] = Field(default_factory=list,
                                         description="one list per image, in upload order: how that image differs "
                                                     "much from the training images (colour into a grey model, a "
                                                     "much larger or smaller size, a far-off aspect ratio); empty "
                                                     "when it does not")
    unknown: list[bool] | None = Field(None, description="one per image, in upload order: true when the image is "
                                                          "unlike the training images (its out-of-distribution "
                                                          "score is below the model's threshold); absent when the "
                                                          "model has no such score or it is turned off")
    ood_scores: list[float] | None = Field(None, description="one per image: the out-of-distribution score "
                                                             "(higher: more like the training images)")
    neighbours: list[list[Neighbour]] | None = Field(None, description="with ?neighbours=K: one list per image, "
                                                                       "in upload order, of its K nearest training "
                                                                       "images, most similar first")
    time_ms: float = Field(description="time the server spent on the request")


class Limits(BaseModel):
    max_upload_bytes: int
    max_files: int
    max_batch: int
    max_top_k: int


class NeighboursInfo(BaseModel):
    rows: int = Field(description="training images in the bank")
    max_k: int = Field(description="the largest ?neighbours=K")
    pictures: bool = Field(description="whether the answers carry thumbnails (false: the server cannot find the "
                                       "training images; labels and similarities still come)")
    pictures_ready: bool = Field(description="whether the training images are read yet (they are read in the "
                                             "background after start-up; until then thumbnails are null)")


class ModelInfo(BaseModel):
    name: str
    classes: list[str]
    num_classes: int
    image_size: int
    channels: int
    metrics: dict[str, float | int | bool | None]
    limits: Limits
    task: str = Field("classification", description="classification (top-k labels) or multilabel (every label "
                                                      "whose score reaches its threshold)")
    thresholds: list[float] | None = Field(None, description="multilabel: the decision threshold of each class")
    unknown: dict[str, Any] | None = Field(None, description="the out-of-distribution score that answers "
                                                             "\"unknown\": {score, threshold, accept_rate}; null "
                                                             "when off")
    neighbours: NeighboursInfo | None = Field(None, description="the nearest training images ?neighbours=K "
                                                                "returns; null when the model has no bank of "
                                                                "training features (or is an ONNX file)")


class Status(BaseModel):
    status: str


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong, in words")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "malformed request", 404: "not found", 408: "the body arrived too slowly",
            413: "upload too large", 415: "not a usable image", 422: "invalid parameter",
            503: "busy, starting or stopping: retry later", 504: "inference took longer than the timeout"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


_BINARY = {"type": "string", "format": "binary"}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "Either multipart/form-data with one or more `files` fields (one image each), "
                       "or one image as the raw body.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {"files": {"type": "array", "items": _BINARY, "minItems": 1,
                                         "description": "repeat the field for several images"}}}},
            "application/octet-stream": {"schema": _BINARY},
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
        },
    }
}


def http_error(status: int, detail: str, retry_after: int | None = None) -> StarletteHTTPException:
    """An error answered as JSON ``{"detail": ...}`` (the app's exception handler), with Retry-After when given."""
    return StarletteHTTPException(status, detail, headers={"Retry-After": str(retry_after)} if retry_after else None)
