"""The OpenAI request and response shapes the API speaks (pydantic), and ``SamplingParams``.

No field is silently ignored: a field this server implements is checked here (a bad value is a 400
in OpenAI's error shape); one of OpenAI's that changes nothing in the answer (``user``, ``store``…)
is accepted; one it does not implement is accepted only at its neutral value
(``presence_penalty: 0``, ``best_of: 1``…) and refused otherwise, and an unknown field is refused,
each by ``unsupported_field()`` naming the field, as OpenAI does. Every response (and the last
streamed chunk) carries a non-standard ``route``: the servers the answer went through."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS_CHAT = 20  # as OpenAI: top_logprobs of chat completions
MAX_LOGPROBS_TEXT = 5  # as OpenAI: logprobs of (legacy) completions
MAX_CHOICES = 16  # n: choices per prompt, each generated in a session of its own
MAX_PROMPTS = 32  # prompts in one completions request
MAX_GENERATIONS = 64  # prompts x n in one request
FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: resolved from the request, read by the engine."""

    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, capped by the context that is left
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N most likely
    echo: bool = False  # the prompt first (with its log-probabilities when logprobs is set)
    grammar: str | None = None  # structured output: the llguidance grammar the answer must follow


# ---------------------------------------------------------------- requests


# OpenAI's request fields that change nothing in the answer: accepted, not used
NEUTRAL_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "stream_options",
     "parallel_tool_calls", "prompt_cache_retention", "prompt_cache_options"}
)  # fmt: skip
# OpenAI's fields this server does not implement -> whether a value is their neutral one (accepted)
NOT_IMPLEMENTED: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "moderation": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "verbosity": lambda v: v is None,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
}
MESSAGE_NOT_IMPLEMENTED: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: v is None,
    "function_call": lambda v: v is None,
    "refusal": lambda v: v is None,
    "audio": lambda v: v is None,
}


def unsupported_field(
    extra: dict[str, Any] | None, not_implemented: dict[str, Callable[[Any], bool]], where: str = ""
) -> InvalidField | None:
    """The first field of ``extra`` (what a request carried beyond the declared fields) that this
    server cannot honour: unknown, or not implemented and set to a value that would change the
    answer; ``None`` when all of them can be accepted."""
    for name, value in (extra or {}).items():
        if name in NEUTRAL_FIELDS and not where:
            continue
        if name in not_implemented:
            if not_implemented[name](value):
                continue
            return InvalidField(f"{where}{name}", f"{where}{name}: not supported by this server")
        return InvalidField(f"{where}{name}", f"unrecognized request argument supplied: {where}{name}")
    return None


@dataclass(frozen=True)
class InvalidField:
    """A request field that is refused (400), with the one-line reason."""

    param: str
    message: str


class _Request(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")  # what is beyond the declared fields: unsupported_field()

    model: str
    max_tokens: int | None = Field(default=None, ge=0)  # 0: completions with echo only (refused())
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)  # choices per prompt
    stream: bool | None = False

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        return stop

    def refused(self) -> InvalidField | None:
        """The first field this request carries that this server cannot honour, if any."""
        return unsupported_field(self.model_extra, NOT_IMPLEMENTED)

    def sampling(self) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(dict.fromkeys(s for s in stops if s)),  # empty strings stop nothing
        )


class TextPart(BaseModel):
    """A part of a message's content; only text is supported."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(min_length=1)
    arguments: str  # JSON, as OpenAI sends it


class ToolCallIn(BaseModel):
    """A call an earlier assistant turn made (``tool_calls`` of an assistant message)."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One turn of a conversation (``developer`` is OpenAI's newer name for ``system``; ``tool``
    carries a tool call's result)."""

    model_config = ConfigDict(extra="allow")  # checked by ChatCompletionRequest.refused()

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool: which call this result answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_template_message(self) -> dict[str, Any]:
        """``{"role", "content"}`` (and a turn's tool calls, a result's call id) for ``tools.py``."""
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id or ""
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")  # as OpenAI
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None  # calls always follow the schema when they are constrained


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS_CHAT)
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema (constrained.py)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    def calling_tools(self) -> bool:
        """Whether the model is offered the tools (``tool_choice`` is not ``"none"``)."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_list(self) -> list[dict[str, Any]]:
        return [tool.model_dump(exclude_none=True) for tool in self.tools or []]

    def must_call(self) -> list[str] | None:
        """The tools one of which the answer must call (``"required"`` or a named one), if any."""
        from corolla.api.tools import allowed_names

        if not self.calling_tools() or self.tool_choice in (None, "auto"):
            return None
        named = isinstance(self.tool_choice, NamedToolChoice)
        choice = self.tool_choice.model_dump() if named else "required"  # type: ignore[union-attr]
        return allowed_names(self.tool_list(), choice)

    def refused(self) -> InvalidField | None:
        for i, message in enumerate(self.messages):
            if found := unsupported_field(message.model_extra, MESSAGE_NOT_IMPLEMENTED, f"messages.{i}."):
                return found
        if self.max_tokens == 0:
            return InvalidField("max_tokens", "max_tokens: must be at least 1")
        if self.top_logprobs is not None and not self.logprobs:
            return InvalidField("top_logprobs", "top_logprobs: needs logprobs: true")
        if found := self._refused_tools():
            return found
        return super().refused()

    def _refused_tools(self) -> InvalidField | None:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            return InvalidField("tools", "tools: two tools have the same name")
        if self.tool_choice not in (None, "none", "auto") and not names:
            return InvalidField("tool_choice", "tool_choice: needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            name = self.tool_choice.function.name
            return InvalidField("tool_choice", f"tool_choice: no tool named {name!r}")
        if self.must_call() and (self.response_format or {}).get("type", "text") != "text":
            return InvalidField("response_format", "response_format: not with a required tool call")
        for i, message in enumerate(self.messages):
            if message.role == "tool" and not message.tool_call_id:
                where = f"messages.{i}.tool_call_id"
                return InvalidField(where, f"{where}: a tool result needs it")
        return None

    def sampling(self) -> SamplingParams:
        params = super().sampling()
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_completion_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        from corolla.api.constrained import grammar_for  # (it raises errors.py's, which imports us)

        response_format = self.response_format
        if calls := self.must_call():  # decoding makes one call of these tools (tools.py)
            from corolla.api.tools import call_schema

            schema = call_schema(self.tool_list(), calls)
            response_format = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}
        grammar = grammar_for(response_format)  # a format it cannot follow: InvalidRequest (400)
        return dataclasses.replace(params, max_tokens=max_tokens, logprobs=logprobs, grammar=grammar)


class CompletionRequest(_Request):
    """``POST /v1/completions``: a prompt, as text or token ids, or a list of them (served
    concurrently, choices in the prompts' order). ``max_tokens=0`` with ``echo`` scores the prompts
    without generating."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS_TEXT)
    echo: bool | None = False

    @field_validator("prompt")
    @classmethod
    def _some_prompts(cls, prompt: Any) -> Any:
        prompts = cls._as_list(prompt)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}")
        if empty := [i for i, one in enumerate(prompts) if not one]:
            raise ValueError(f"prompt {empty[0]} is empty")
        return prompt

    @staticmethod
    def _as_list(prompt: Any) -> list[Any]:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            return [prompt]  # one prompt: text, or token ids
        return list(prompt)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids; one choice each (``n`` each), in this order."""
        return self._as_list(self.prompt)

    def refused(self) -> InvalidField | None:
        if len(self.prompts()) * (self.n or 1) > MAX_GENERATIONS:
            return InvalidField("n", f"n: prompts x n may be at most {MAX_GENERATIONS} in one request")
        if self.max_tokens == 0 and not self.echo:
            return InvalidField("max_tokens", "max_tokens: 0 is allowed only with echo (scoring the prompt)")
        return super().refused()

    def sampling(self) -> SamplingParams:
        params = super().sampling()
        return dataclasses.replace(params, logprobs=self.logprobs, echo=bool(self.echo))


# ---------------------------------------------------------------- responses


class RouteHop(BaseModel):
    """One server of the chain an answer went through: it ran blocks ``start..end-1``."""

    peer_id: str
    start: int
    end: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class TopLogprob(BaseModel):
    """A token and its log-probability (chat's shape); ``bytes``: its UTF-8 encoding."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """A chat choice's (or chunk's) ``logprobs``: one entry per generated token."""

    content: list[ChatTokenLogprob] | None
    refusal: None = None


class TextLogprobs(BaseModel):
    """A text completion's ``logprobs`` (OpenAI's legacy shape): parallel lists, one item per token;
    a prompt's first token (with ``echo``) has ``None`` for its log-probability and alternatives."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    route: list[RouteHop]


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # on the last chunk
    route: list[RouteHop] | None = None  # on the last chunk


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: TextLogprobs | None = None


class TextCompletion(BaseModel):
    """A text completion, or (streamed) one chunk of it: OpenAI uses the same object for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None
    route: list[RouteHop] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "corolla"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
