"""Response bodies of one request, chat or text completion: whole, or as streamed chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from corolla.api.engine import Finished, Piece, TokenLogprob
from corolla.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatTokenLogprob,
    ChunkChoice,
    Delta,
    RouteHop,
    TextChoice,
    TextCompletion,
    TextLogprobs,
    TopLogprob,
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


def utf8(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(scored: Sequence[TokenLogprob]) -> ChatLogprobs:
    """Chat's ``logprobs``: each generated token, its log-probability and the most likely ones."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=s.token, logprob=s.logprob or 0.0, bytes=utf8(s.token),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=utf8(t)) for t, lp in s.top or ()],
            )  # fmt: skip
            for s in scored
        ]
    )


def text_logprobs(scored: Sequence[TokenLogprob], offset: int = 0) -> TextLogprobs:
    """Completions' ``logprobs``: parallel lists; ``top_logprobs`` always holds the chosen token too,
    as OpenAI's; ``text_offset`` counts characters from ``offset`` (where these tokens' text starts)."""
    offsets = []
    for s in scored:
        offsets.append(offset)
        offset += len(s.token)
    return TextLogprobs(
        tokens=[s.token for s in scored],
        token_logprobs=[s.logprob for s in scored],
        top_logprobs=[
            None if s.logprob is None else {**dict(s.top or ()), s.token: s.logprob} for s in scored
        ],
        text_offset=offsets,
    )


class ResponseFormat(Protocol):
    """How one endpoint writes its answer; one instance per request (it holds the id)."""

    def opening(self) -> dict[str, Any] | None: ...
    def chunk(self, piece: Piece) -> dict[str, Any]: ...
    def closing(self, finished: Finished) -> dict[str, Any]: ...
    def whole(self, piece: Piece, finished: Finished) -> dict[str, Any]: ...


class _Format:
    prefix = "cmpl"

    def __init__(self, model: str, *, logprobs: bool = False) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs  # whether the request asked for log-probabilities

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}


class ChatFormat(_Format):
    """``chat.completion`` and ``chat.completion.chunk``: the first chunk names the role."""

    prefix = "chatcmpl"

    def opening(self) -> dict[str, Any] | None:
        return self._chunk(ChunkChoice(delta=Delta(role="assistant", content="")))

    def chunk(self, piece: Piece) -> dict[str, Any]:
        scored = chat_logprobs(piece.logprobs) if self.logprobs else None
        return self._chunk(ChunkChoice(delta=Delta(content=piece.text), logprobs=scored))

    def closing(self, finished: Finished) -> dict[str, Any]:
        choice = ChunkChoice(delta=Delta(), finish_reason=finished.finish_reason)
        return self._chunk(choice, usage=usage_of(finished), route=route_of(finished.route))

    def whole(self, piece: Piece, finished: Finished) -> dict[str, Any]:
        choice = ChatChoice(
            message=AssistantMessage(content=piece.text), finish_reason=finished.finish_reason,
            logprobs=chat_logprobs(piece.logprobs) if self.logprobs else None,
        )  # fmt: skip
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

    def __init__(self, model: str, *, logprobs: bool = False) -> None:
        super().__init__(model, logprobs=logprobs)
        self.offset = 0  # characters streamed so far: where the next chunk's text_offset starts

    def chunk(self, piece: Piece) -> dict[str, Any]:
        scored = text_logprobs(piece.logprobs, self.offset) if self.logprobs else None
        self.offset += len(piece.text)
        return self._body(TextChoice(text=piece.text, logprobs=scored))

    def closing(self, finished: Finished) -> dict[str, Any]:
        choice = TextChoice(text="", finish_reason=finished.finish_reason)
        return self._body(choice, usage=usage_of(finished), route=route_of(finished.route))

    def whole(self, piece: Piece, finished: Finished) -> dict[str, Any]:
        scored = text_logprobs(piece.logprobs) if self.logprobs else None
        choice = TextChoice(text=piece.text, finish_reason=finished.finish_reason, logprobs=scored)
        return self._body(choice, usage=usage_of(finished), route=route_of(finished.route))

    def _body(self, choice: TextChoice, **extra: Any) -> dict[str, Any]:
        return _without_none(TextCompletion(**self._head(), choices=[choice], **extra).model_dump())


def _without_none(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without its ``None`` entries (``usage`` and ``route`` appear on the last chunk only)."""
    return {k: v for k, v in body.items() if v is not None}
