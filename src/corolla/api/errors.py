"""Exceptions -> OpenAI error responses: a status code and ``{"error": {...}}``, one line, no traceback."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from corolla.api.schemas import ErrorBody, ErrorDetail
from corolla.errors import CorollaError, MissingBlocks, ServerUnavailable, SwarmUnavailable

logger = logging.getLogger(__name__)

UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class InvalidRequest(ValueError):
    """The request cannot be served as asked (unknown model, prompt too long…): a 400."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class ApiError:
    """What the client receives: a status and OpenAI's error shape."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorBody(error=detail).model_dump()


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def api_error(error: BaseException) -> ApiError:
    """The client's view of ``error``: 400 for the request's fault, 503 when the swarm cannot serve,
    502 when a server failed, 500 for our own bugs (logged with the traceback, never sent)."""
    if isinstance(error, InvalidRequest):
        return ApiError(400, one_line(error), "invalid_request_error", error.param, error.code)
    if isinstance(error, MissingBlocks):
        return ApiError(503, one_line(error), "service_unavailable", code="missing_blocks")
    if isinstance(error, SwarmUnavailable | ServerUnavailable):
        return ApiError(503, one_line(error), "service_unavailable", code="swarm_unavailable")
    if isinstance(error, CorollaError):
        return ApiError(502, one_line(error), "server_error", code="swarm_error")
    logger.error("internal error while serving a request", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}: {one_line(error)}", "server_error")


def validation_error(errors: Sequence[Any]) -> ApiError:
    """A pydantic/FastAPI validation failure -> 400 naming the first offending field."""
    first = dict(errors[0]) if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # after the field, a union's member type may follow ("stop.str", "stop.list[str]"): not shown
    loc = list(itertools.takewhile(lambda part: part not in UNION_TAGS and "[" not in part, loc))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {message}", "invalid_request_error")
    field = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return ApiError(400, f"{where}: {message}", "invalid_request_error", field, "invalid_value")


def unknown_model(asked: str, available: Sequence[str]) -> InvalidRequest:
    names = ", ".join(repr(name) for name in available) or "none"
    return InvalidRequest(
        f"the model {asked!r} does not exist here; available: {names}", param="model", code="model_not_found"
    )
