"""The route handlers, as methods of :class:`Routes` over one app's :class:`ServerState`, and :func:`register`,
the one place that says which URL runs which handler.

A handler can be called without HTTP (``await Routes(state).readyz()``); ``predict_answer`` builds the
predict route's JSON from model rows alone.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from imgrec.serve.batcher import BatcherStopped, QueueFull
from imgrec.serve.neighbours import MAX_NEIGHBOURS
from imgrec.serve.page import DOCS_UNAVAILABLE, Assets, load_static, load_swagger_assets
from imgrec.serve.schemas import PREDICT_BODY, ModelInfo, PredictResponse, Status, error_responses, http_error
from imgrec.serve.settings import MAX_TOP_K
from imgrec.serve.state import Row, ServerState
from imgrec.serve.uploads import Body, decode_all, drain, read_uploads

__all__ = ["Routes", "register", "predict_answer"]

log = logging.getLogger("imgrec.serve")

TOP_K = Query(None, ge=1, le=MAX_TOP_K, description="labels per image (default 5, capped at the number of classes); "
                                                    "not for a multi-label model, which returns every label whose "
                                                    "score reaches its threshold")
NEIGHBOURS = Query(0, ge=0, le=MAX_NEIGHBOURS,
                   description=f"also the K (at most {MAX_NEIGHBOURS}) training images nearest to each image in "
                               "feature space, with label, cosine similarity, index and a thumbnail (default 0: "
                               "none); 400 for a model without a bank of training features (see /v1/model)")
NO_BANK = ("this model has no bank of training features, so no nearest training images (an exported ONNX file "
           "has none; a model directory gets one from `imgrec train`)")


def predict_answer(classifier, rows: list[Row], notes: list[list[str]], top_k: int | None) -> dict[str, Any]:
    """The predict route's JSON, without ``time_ms``: each image's labels, its input notes, and "unknown"
    with the out-of-distribution scores when the model answers it."""
    if classifier.multilabel:  # the rows hold the labels at or above their thresholds already
        predictions = [row.labels for row in rows]
    else:
        k = 5 if top_k is None else top_k
        classes = classifier.classes
        predictions = [[{"label": classes[j], "score": s} for s, j in zip(row.scores[:k], row.classes[:k])]
                       for row in rows]
    answer: dict[str, Any] = {"model": classifier.name, "predictions": predictions, "input_notes": notes}
    ood = None if not rows or rows[0].ood is None else np.array([row.ood for row in rows])
    flags = classifier.mark_unknown(predictions, ood)
    if flags and "unknown" in flags[0]:
        answer.update(unknown=[f["unknown"] for f in flags], ood_scores=[f["ood_score"] for f in flags])
    return answer


class Routes:
    """Every handler of one app. The page's files are read once, here, at start-up."""

    def __init__(self, state: ServerState, static: Assets | None = None, swagger: Assets | None = None):
        self.state = state
        self.classifier = state.classifier
        self.settings = state.settings
        self.static = load_static() if static is None else static
        self.swagger = load_swagger_assets() if swagger is None else swagger

    # -- POST /v1/predict ------------------------------------------------------------------------
    async def predict(self, request: Request, top_k: int | None = TOP_K, neighbours: int = NEIGHBOURS):
        t0 = time.perf_counter()
        body = Body(self.state)
        try:
            if self.classifier.multilabel and top_k is not None:
                raise http_error(400, "top_k does not apply to a multi-label model: it returns every label "
                                      "whose score reaches that label's threshold")
            if neighbours and self.state.neighbours is None:
                raise http_error(400, NO_BANK)
            rows, notes = await self._run_predict(request, body, t0, features=neighbours > 0)
        except StarletteHTTPException as e:
            if not body.finished:
                # Answered before the whole body was read. A short remainder is read and dropped so the
                # client can read the answer and keep its connection; a body over the limit (413), one
                # too slow (408), or one that keeps coming gets the answer and a closed connection instead.
                if e.status_code in (408, 413) or not await drain(request, body,
                                                                  min(self.settings.read_timeout_s, 2.0)):
                    e.headers = {**(e.headers or {}), "Connection": "close"}
            raise
        answer = predict_answer(self.classifier, rows, notes, top_k)
        if neighbours and rows:  # a matrix product and, the first time, thumbnails: off the event loop
            answer["neighbours"] = await anyio.to_thread.run_sync(
                self.state.neighbours.lookup, np.stack([row.features for row in rows]), neighbours)
        answer["time_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return JSONResponse(answer)

    async def _run_predict(self, request: Request, body: Body, t0: float,
                           features: bool = False) -> tuple[list[Row], list[list[str]]]:
        """Admit the request, read and decode its images, and wait for the model's rows (with their features
        when ``features``)."""
        state, settings = self.state, self.settings
        if not state.ready or not state.batcher.alive:
            raise http_error(503, "the model is not ready", retry_after=1)
        if state.active >= state.max_concurrent:
            raise http_error(503, f"server busy: {state.active} requests in progress; retry shortly", retry_after=1)
        state.active += 1
        state.batcher.announce()  # the batcher may hold a batch open for this request
        announced = True
        try:
            images, notes = await self._receive(request, body, t0)
            remaining = settings.timeout_s - (time.perf_counter() - t0)
            try:
                announced = False
                result = state.batcher.enqueue(images, announced=True, within=remaining, features=features)
            except QueueFull:
                raise http_error(503, "server busy: the model's queue is full; retry shortly", retry_after=1) from None
            except BatcherStopped as e:
                raise http_error(503, str(e), retry_after=1) from None
            return await self._rows(result, remaining), notes
        finally:
            if announced:
                state.batcher.withdraw()
            body.release()
            state.active -= 1

    async def _receive(self, request: Request, body: Body, t0: float):
        """The request's images decoded into one batch, and their input notes (body limits enforced)."""
        settings = self.settings
        body.check_declared(request)
        try:
            uploads, multipart = await _with_timeout(read_uploads(request, body, settings.max_files),
                                                     settings.read_timeout_s)
        except TimeoutError:
            raise http_error(408, f"the request body did not arrive within {settings.read_timeout_s:g} s") from None
        except ClientDisconnect:
            raise http_error(400, "the client disconnected before sending the whole body") from None
        images, notes = await anyio.to_thread.run_sync(decode_all, self.classifier, uploads, multipart,
                                                       t0 + settings.timeout_s, settings.timeout_s,
                                                       limiter=self.state.decode_limiter)
        del uploads
        body.release()
        return images, notes

    async def _rows(self, result: asyncio.Future, remaining: float) -> list[Row]:
        try:
            # on timeout wait_for cancels the future: the worker skips it, or drops its finished rows
            return await asyncio.wait_for(result, max(remaining, 0.0))
        except TimeoutError:
            raise http_error(504, f"inference did not finish within {self.settings.timeout_s:g} s") from None
        except BatcherStopped as e:
            raise http_error(503, str(e), retry_after=1) from None

    # -- model and health ------------------------------------------------------------------------
    async def model_info(self):
        clf, settings = self.classifier, self.settings
        # numbers only (no paths or free text), finite and float-sized (JSON has no NaN: a NaN val_loss from a
        # diverged run, or one written into a handed model.json, would fail the whole answer)
        metrics = {k: (v if v is None or isinstance(v, bool) or _plain_number(v) else None)
                   for k, v in clf.meta.metrics.items() if v is None or isinstance(v, (int, float, bool))}
        # float32, as the predictors compare scores with them
        thresholds = [float(np.float32(t)) for t in clf.thresholds] if clf.multilabel else None
        return JSONResponse({
            "name": clf.name, "classes": list(clf.classes), "num_classes": len(clf.classes),
            "image_size": clf.image_size, "channels": clf.channels, "metrics": metrics,
            "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_files": settings.max_files,
                       "max_batch": settings.max_batch, "max_top_k": MAX_TOP_K},
            "task": "multilabel" if clf.multilabel else "classification", "thresholds": thresholds,
            "unknown": None if clf.unknown_threshold is None else
            {"score": clf.unknown["score"], "threshold": clf.unknown_threshold},
            "neighbours": None if self.state.neighbours is None else self.state.neighbours.info()})

    async def healthz(self):
        return {"status": "ok"}

    async def readyz(self):
        if self.state.ready and self.state.batcher.alive:
            return {"status": "ready"}
        raise http_error(503, "not ready: the model worker is starting, stopping or stopped", retry_after=1)

    async def metrics(self):
        if self.state.metrics is None:
            raise http_error(404, "metrics need the prometheus-client package: pip install 'imgrec[serve]'")
        content, media_type = self.state.metrics.render()
        return Response(content, media_type=media_type)

    # -- the page, its files, and the offline API docs -------------------------------------------
    def _asset(self, name: str) -> Response:
        content, media_type = self.static[name]
        return Response(content, media_type=media_type)

    async def index(self):
        return self._asset("index.html")

    async def static_file(self, name: str):
        if name not in self.static or name.endswith(".html"):
            raise http_error(404, "not found")
        return self._asset(name)

    async def swagger_file(self, name: str):
        if name not in self.swagger:
            raise http_error(404, "not found")
        content, media_type = self.swagger[name]
        return Response(content, media_type=media_type)

    async def docs(self):
        return self._asset("docs.html") if self.swagger else HTMLResponse(DOCS_UNAVAILABLE)


async def _with_timeout(coro, seconds: float):
    """``await coro`` or raise TimeoutError. On Python 3.11+ without wrapping it in a new task, as
    ``asyncio.wait_for`` does: that task and its extra event-loop turn showed up in profiles of busy servers."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)  # pragma: no cover - Python 3.10


# -- errors: always JSON {"detail": "..."} -----------------------------------------------------------
async def _http_error_handler(request: Request, exc: StarletteHTTPException):
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error_handler(request: Request, exc: RequestValidationError):
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)


async def _internal_error_handler(request: Request, exc: Exception):
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def register(app: FastAPI, routes: Routes, metrics: bool = False) -> None:
    """Every URL of the app, its error handlers, and ``/metrics`` when ``metrics`` (left out of the OpenAPI
    schema: it is for the operator's scraper, not for API clients)."""
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(Exception, _internal_error_handler)
    app.add_api_route("/v1/predict", routes.predict, methods=["POST"], response_model=PredictResponse,
                      openapi_extra=PREDICT_BODY, tags=["predict"], summary="Classify one or more images",
                      responses=error_responses(400, 408, 413, 415, 422, 503, 504))
    app.add_api_route("/v1/model", routes.model_info, methods=["GET"], response_model=ModelInfo, tags=["model"],
                      summary="The served model")
    app.add_api_route("/healthz", routes.healthz, methods=["GET"], response_model=Status, tags=["health"],
                      summary="Liveness: the server answers")
    app.add_api_route("/readyz", routes.readyz, methods=["GET"], response_model=Status, tags=["health"],
                      responses=error_responses(503),
                      summary="Readiness: the model is loaded, warmed up, and its worker runs")
    if metrics:
        app.add_api_route("/metrics", routes.metrics, methods=["GET"], include_in_schema=False)
    for path, handler in (("/", routes.index), ("/static/{name}", routes.static_file),
                          ("/static/swagger/{name}", routes.swagger_file), ("/docs", routes.docs)):
        app.add_api_route(path, handler, methods=["GET"], include_in_schema=False)


def _plain_number(v: int | float) -> bool:
    try:
        return math.isfinite(v) and abs(v) < 1e300
    except OverflowError:  # an integer of hundreds of digits
        return False
