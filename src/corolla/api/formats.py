"""Response bodies of one request, chat or text completion: whole, or as streamed chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from corolla.api.engine import Finished
from corolla.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    RouteHop,
    TextChoice,
    TextCompletion,
    Usage,
)
from corolla.client.routing import Hop

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def route_of(hops: Sequence[Hop]) -> list[RouteHop]:
    return [RouteHop(peer_id=h.peer_id, start=h.start, end=h.end) for h in hops]


def usage_of(finished: Finished) -> Usage:
    return Usage.of(finished.prompt_tokens, finished.completion_tokens)


class ResponseFormat(Protocol):
    """How one endpoint writes its answer; one instance per request (it holds the id)."""

    def opening(self) -> dict[str, Any] | None: ...
    def chunk(self, text: str) -> dict[str, Any]: ...
    def closing(self, finished: Finished) -> dict[str, Any]: ...
    def whole(self, text: str, finished: Finished) -> dict[str, Any]: ...


class _Format:
    prefix = "cmpl"

    def __init__(self, model: str) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}


class ChatFormat(_Format):
    """``chat.completion`` and ``chat.completion.chunk``: the first chunk names the role."""

    prefix = "chatcmpl"

    def opening(self) -> dict[str, Any] | None:
        return self._chunk(ChunkChoice(delta=Delta(role="assistant", content="")))

    def chunk(self, text: str) -> dict[str, Any]:
        return self._chunk(ChunkChoice(delta=Delta(content=text)))

    def closing(self, finished: Finished) -> dict[str, Any]:
        choice = ChunkChoice(delta=Delta(), finish_reason=finished.finish_reason)
        return self._chunk(choice, usage=usage_of(finished), route=route_of(finished.route))

    def whole(self, text: str, finished: Finished) -> dict[str, Any]:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finished.finish_reason)
        body = ChatCompletion(
            **self._head(), choices=[choice], usage=usage_of(finished), route=route_of(finished.route)
        )
        return body.model_dump()

    def _chunk(self, choice: ChunkChoice, **extra: Any) -> dict[str, Any]:
        body = _without_none(ChatCompletionChunk(**self._head(), choices=[choice], **extra).model_dump())
        for item in body["choices"]:
            item["delta"] = _without_none(item["delta"])  # as OpenAI: {"content": "…"}, then {}
        return body


class TextFormat(_Format):
    """``text_completion``, whole or in chunks (OpenAI uses the same object for both)."""

    def opening(self) -> dict[str, Any] | None:
        return None

    def chunk(self, text: str) -> dict[str, Any]:
        return self._body(TextChoice(text=text))

    def closing(self, finished: Finished) -> dict[str, Any]:
        choice = TextChoice(text="", finish_reason=finished.finish_reason)
        return self._body(choice, usage=usage_of(finished), route=route_of(finished.route))

    def whole(self, text: str, finished: Finished) -> dict[str, Any]:
        choice = TextChoice(text=text, finish_reason=finished.finish_reason)
        return self._body(choice, usage=usage_of(finished), route=route_of(finished.route))

    def _body(self, choice: TextChoice, **extra: Any) -> dict[str, Any]:
        return _without_none(TextCompletion(**self._head(), choices=[choice], **extra).model_dump())


def _without_none(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without its ``None`` entries (``usage`` and ``route`` appear on the last chunk only)."""
    return {k: v for k, v in body.items() if v is not None}
