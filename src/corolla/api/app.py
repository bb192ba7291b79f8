"""``create_app(engine)``: the OpenAI-compatible API, the swarm view and the web page, as a FastAPI app.

Routes: ``GET /v1/models`` and ``/v1/models/{id}``, ``POST /v1/chat/completions``, ``POST
/v1/completions`` (``stream``: server-sent events), ``GET /api/swarm``, ``GET /metrics``, ``GET /``
and ``/static/…``. Every error
is OpenAI's ``{"error": {...}}`` with one line of message: 400 for a bad request (validation too,
never FastAPI's 422), 503 when the swarm cannot serve the model, 502 when a server failed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from corolla.api.engine import Backend
from corolla.api.errors import ApiError, InvalidRequest, api_error, unknown_model, validation_error
from corolla.api.formats import ChatFormat, ResponseFormat, Summary, TextFormat
from corolla.api.metrics import ApiMetrics, MetricsMiddleware
from corolla.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingParams
from corolla.api.streaming import EventStreamResponse, LiveChoices, event_stream, watching_disconnect
from corolla.errors import CorollaError

STATIC_DIR = Path(__file__).parent / "static"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


def create_app(engine: Backend, *, metrics: ApiMetrics | None = None) -> FastAPI:
    """The app serving ``engine`` (an ``Engine``, or anything with its interface); its metrics go
    to ``metrics`` (default: a new registry of its own)."""
    metrics = metrics or ApiMetrics()
    app = FastAPI(title="corolla", summary="An OpenAI-compatible API over a corolla swarm")
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _add_error_handlers(app)
    created = int(time.time())

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The model, when the swarm serves all its blocks right now; else an empty list."""
        complete = await asyncio.to_thread(engine.serves_all_blocks)
        cards = [ModelCard(id=engine.model_id, created=created)] if complete else []
        return ModelList(data=cards).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        """This API's model (under any name requests may call it); 404 ``model_not_found`` else."""
        if model_id not in engine.names:
            error = unknown_model(model_id, [engine.model_id])
            return _error_response(ApiError(404, str(error), "invalid_request_error", "model", error.code))
        return JSONResponse(ModelCard(id=engine.model_id, created=created).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check_model(engine, body)
        tools = body.tool_list() if body.calling_tools() else None
        prompt_ids = engine.encode_chat([m.as_template_message() for m in body.messages], tools)
        names = body.must_call() or [tool["function"]["name"] for tool in tools or []]
        fmt = ChatFormat(body.model, logprobs=bool(body.logprobs), tools=tools, call_names=names)
        return await _answer(request, engine, metrics, body, [prompt_ids], fmt)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(engine, body)
        prompts = [engine.encode_text(prompt) for prompt in body.prompts()]
        fmt = TextFormat(body.model, logprobs=body.logprobs is not None)
        return await _answer(request, engine, metrics, body, prompts, fmt)

    @app.get("/api/swarm")
    async def swarm() -> dict[str, Any]:
        """``corolla swarm --json`` for this model, plus ``model`` and ``complete``."""
        return await asyncio.to_thread(engine.swarm)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _check_model(engine: Backend, body: ChatCompletionRequest | CompletionRequest) -> None:
    """The request names this API's model and asks only for what this server can honour."""
    if body.model not in engine.names:
        raise unknown_model(body.model, [engine.model_id])
    if (field := body.refused()) is not None:
        raise InvalidRequest(field.message, param=field.param, code="unsupported_parameter")


async def _answer(request: Request, engine: Backend, metrics: ApiMetrics,
                  body: ChatCompletionRequest | CompletionRequest, prompts: list[list[int]],
                  fmt: ResponseFormat) -> Response:  # fmt: skip
    """Generate every choice (``n`` per prompt) concurrently; one JSON body, or a stream of events
    once the first one came (so that a swarm that cannot serve is still a proper 503, not a broken
    stream)."""
    choices = LiveChoices(engine, generations(prompts, body.sampling(), body.n or 1), metrics)
    prompt_tokens = sum(len(ids) for ids in prompts)
    try:
        async with watching_disconnect(request, choices):
            if body.stream:
                first = await choices.next()
                stream = event_stream(first, choices, fmt, prompt_tokens)
                return EventStreamResponse(stream, on_close=choices.cancel)
            results = await choices.collect()
    except BaseException:  # failed, or the request was cancelled: stop generating
        choices.cancel()
        raise
    if await request.is_disconnected():
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; the metrics tell
    return JSONResponse(fmt.whole(results, Summary.of([f for _, f in results], prompt_tokens)))


def generations(
    prompts: list[list[int]], params: SamplingParams, n: int
) -> list[tuple[list[int], SamplingParams]]:
    """One generation per choice: ``n`` per prompt, prompts in order. With a ``seed``, choice ``i``
    of a prompt samples with ``seed + i``: the choices differ, and each is reproducible."""
    return [
        (ids, params if params.seed is None else dataclasses.replace(params, seed=params.seed + i))
        for ids in prompts
        for i in range(n)
    ]


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _add_error_handlers(app: FastAPI) -> None:
    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _error_response(validation_error(exc.errors()))

    async def http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error_response(ApiError(exc.status_code, message, kind, code=code))

    async def known(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(api_error(exc))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(api_error(exc))  # logs the traceback; the client gets one line

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(InvalidRequest, known)
    app.add_exception_handler(CorollaError, known)
    app.add_exception_handler(Exception, unexpected)
