"""Response bodies of one request, chat or text completion: whole, or as streamed chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from corolla.api.tools import ToolCall, parse_call
from corolla.client.routing import Hop

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def route_of(hops: Sequence[Hop]) -> list[RouteHop]:
    return [RouteHop(peer_id=h.peer_id, start=h.start, end=h.end) for h in hops]


def utf8(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(scored: Sequence[TokenLogprob]) -> ChatLogprobs:
    """Chat's ``logprobs``: each generated token, its log-probability and the most likely ones."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=s.token,
                logprob=s.logprob or 0.0,
                bytes=utf8(s.token),
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


@dataclass(frozen=True)
class Summary:
    """What a whole answer (or its last chunk) carries besides its choices: the usage of all its
    choices and the route of its first (``route`` is corolla's own field)."""

    usage: Usage
    route: list[RouteHop]

    @classmethod
    def of(cls, finished: Mapping[int, Finished] | Sequence[Finished], prompt_tokens: int) -> Summary:
        """``prompt_tokens``: of all the request's prompts, each counted once (not once per ``n``)."""
        ends = list(finished.values()) if isinstance(finished, Mapping) else list(finished)
        first = finished[0]
        return cls(Usage.of(prompt_tokens, sum(f.completion_tokens for f in ends)), route_of(first.route))


class ResponseFormat(Protocol):
    """How one endpoint writes its answer; one instance per request (it holds the id). ``index``:
    which choice (``n`` per prompt, prompts in order). A chunk may be held back (``None``) and
    sent with the choice's closing chunks."""

    def opening(self, index: int) -> dict[str, Any] | None: ...
    def chunk(self, piece: Piece, index: int) -> dict[str, Any] | None: ...
    def closing(self, finished: Finished, index: int, summary: Summary | None) -> list[dict[str, Any]]: ...
    def whole(self, choices: Sequence[tuple[Piece, Finished]], summary: Summary) -> dict[str, Any]: ...


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
    """``chat.completion`` and ``chat.completion.chunk``: the first chunk names the role. With
    ``tools`` offered, an answer that is a call of one of ``call_names`` becomes ``tool_calls``
    (``tools.py``); streamed, such answers are held back until they end, then sent in one piece."""

    prefix = "chatcmpl"

    def __init__(self, model: str, *, logprobs: bool = False, tools: list[dict[str, Any]] | None = None,
                 call_names: list[str] | None = None) -> None:  # fmt: skip
        super().__init__(model, logprobs=logprobs)
        self.tools, self.call_names = tools or [], call_names or []
        self.held: dict[int, list[Piece]] = {}  # per choice, what was generated and not sent yet

    def opening(self, index: int) -> dict[str, Any] | None:
        return self._chunk(ChunkChoice(index=index, delta=Delta(role="assistant", content="")))

    def chunk(self, piece: Piece, index: int) -> dict[str, Any] | None:
        if self.tools:  # a call or text? only the whole answer tells
            self.held.setdefault(index, []).append(piece)
            return None
        return self._content(piece, index)

    def closing(self, finished: Finished, index: int, summary: Summary | None) -> list[dict[str, Any]]:
        chunks = []
        reason = finished.finish_reason
        if self.tools:
            whole = Piece.join(self.held.pop(index, []))
            if call := self._call(whole.text):
                delta = Delta(tool_calls=[call.to_openai(index=0)])
                chunks.append(self._chunk(ChunkChoice(index=index, delta=delta)))
                reason = "tool_calls"
            elif whole.text or whole.logprobs:
                chunks.append(self._content(whole, index))
        choice = ChunkChoice(index=index, delta=Delta(), finish_reason=reason)
        extra = {} if summary is None else {"usage": summary.usage, "route": summary.route}
        return [*chunks, self._chunk(choice, **extra)]

    def whole(self, choices: Sequence[tuple[Piece, Finished]], summary: Summary) -> dict[str, Any]:
        bodies = []
        for index, (piece, finished) in enumerate(choices):
            scored = chat_logprobs(piece.logprobs) if self.logprobs else None
            reason, message = finished.finish_reason, AssistantMessage(content=piece.text)
            if call := self._call(piece.text):
                reason, message = "tool_calls", AssistantMessage(content=None, tool_calls=[call.to_openai()])
            bodies.append(ChatChoice(index=index, message=message, finish_reason=reason, logprobs=scored))
        body = ChatCompletion(
            **self._head(), choices=bodies, usage=summary.usage, route=summary.route
        ).model_dump()
        for choice in body["choices"]:
            if choice["message"]["tool_calls"] is None:
                del choice["message"]["tool_calls"]  # as OpenAI: only an answer that calls has them
        return body

    def _call(self, text: str) -> ToolCall | None:
        return parse_call(text, self.tools, self.call_names) if self.tools else None

    def _content(self, piece: Piece, index: int) -> dict[str, Any]:
        scored = chat_logprobs(piece.logprobs) if self.logprobs else None
        return self._chunk(ChunkChoice(index=index, delta=Delta(content=piece.text), logprobs=scored))

    def _chunk(self, choice: ChunkChoice, **extra: Any) -> dict[str, Any]:
        body = _without_none(ChatCompletionChunk(**self._head(), choices=[choice], **extra).model_dump())
        for item in body["choices"]:
            item["delta"] = _without_none(item["delta"])  # as OpenAI: {"content": "…"}, then {}
        return body


class TextFormat(_Format):
    """``text_completion``, whole or in chunks (OpenAI uses the same object for both)."""

    def __init__(self, model: str, *, logprobs: bool = False) -> None:
        super().__init__(model, logprobs=logprobs)
        self.offsets: dict[int, int] = {}  # per choice, characters streamed: the next text_offset

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def chunk(self, piece: Piece, index: int) -> dict[str, Any]:
        offset = self.offsets.get(index, 0)
        scored = text_logprobs(piece.logprobs, offset) if self.logprobs else None
        self.offsets[index] = offset + len(piece.text)
        return self._body([TextChoice(index=index, text=piece.text, logprobs=scored)])

    def closing(self, finished: Finished, index: int, summary: Summary | None) -> list[dict[str, Any]]:
        choice = TextChoice(index=index, text="", finish_reason=finished.finish_reason)
        if summary is None:
            return [self._body([choice])]
        return [self._body([choice], usage=summary.usage, route=summary.route)]

    def whole(self, choices: Sequence[tuple[Piece, Finished]], summary: Summary) -> dict[str, Any]:
        bodies = [
            TextChoice(
                index=index,
                text=piece.text,
                finish_reason=finished.finish_reason,
                logprobs=text_logprobs(piece.logprobs) if self.logprobs else None,
            )  # fmt: skip
            for index, (piece, finished) in enumerate(choices)
        ]
        return self._body(bodies, usage=summary.usage, route=summary.route)

    def _body(self, choices: list[TextChoice], **extra: Any) -> dict[str, Any]:
        return _without_none(TextCompletion(**self._head(), choices=choices, **extra).model_dump())


def _without_none(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without its ``None`` entries (``usage`` and ``route`` appear on the last chunk only)."""
    return {k: v for k, v in body.items() if v is not None}
