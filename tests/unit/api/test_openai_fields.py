"""Every request field of OpenAI's own client (the installed ``openai`` package's parameter types) is
either implemented here, accepted because it changes nothing in the answer, or refused with a 400
naming it: none is silently ignored. A field OpenAI adds later fails this test until it is placed."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from api_fakes import FakeEngine
from fastapi.testclient import TestClient
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from corolla.api.app import create_app
from corolla.api.schemas import NEUTRAL_FIELDS, NOT_IMPLEMENTED

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}
TEXT = {"model": "fake-model", "prompt": "Hi"}
# implemented: a value that changes the answer, and what the engine must have been asked
IMPLEMENTED: dict[str, tuple[Any, str, Any]] = {
    "max_tokens": (5, "max_tokens", 5),
    "max_completion_tokens": (6, "max_tokens", 6),
    "temperature": (0.5, "temperature", 0.5),
    "top_p": (0.5, "top_p", 0.5),
    "seed": (3, "seed", 3),
    "stop": (["x"], "stop", ("x",)),
    "n": (1, "max_tokens", None),  # n > 1: several choices, tested in test_app
    "logprobs": (True, "logprobs", 0),
    "top_logprobs": (2, "logprobs", 2),  # needs logprobs: true (below)
    "echo": (True, "echo", True),
    "response_format": ({"type": "json_object"}, "grammar", ...),
    "tools": ([{"type": "function", "function": {"name": "f"}}], "grammar", None),
    "tool_choice": ("required", "grammar", ...),  # needs tools (below)
    "stream": (False, "max_tokens", None),
}
TEXT_IMPLEMENTED = {"logprobs": (2, "logprobs", 2)}  # completions' logprobs: how many alternatives
REQUIRED = {"model", "messages", "prompt"}
# a value of each field accepted as neutral, where a string is not one ("x" elsewhere)
NEUTRAL_VALUES: dict[str, Any] = {
    "stream_options": {"include_usage": True}, "store": True, "parallel_tool_calls": True,
    "metadata": {"k": "v"}, "prompt_cache_options": {"k": "v"},
}  # fmt: skip
# a value of each refused field that would change the answer
NON_NEUTRAL: dict[str, Any] = {
    "frequency_penalty": 0.5, "presence_penalty": 0.5, "logit_bias": {"1": 5}, "functions": [{"name": "f"}],
    "function_call": {"name": "f"}, "modalities": ["audio"], "audio": {"voice": "alloy"},
    "prediction": {"type": "content", "content": "x"}, "web_search_options": {}, "reasoning_effort": "high",
    "verbosity": "low", "best_of": 2, "suffix": "x", "moderation": {"x": 1},
}  # fmt: skip


def openai_fields(params: type) -> list[str]:
    return sorted(typing.get_type_hints(params))


@pytest.mark.parametrize(
    ("path", "base", "params"),
    [("/v1/chat/completions", CHAT, chat_create_params.CompletionCreateParamsBase),
     ("/v1/completions", TEXT, completion_create_params.CompletionCreateParamsBase)],
)  # fmt: skip
def test_every_openai_field_is_implemented_neutral_or_refused_by_name(
    path: str, base: dict[str, Any], params: type
) -> None:
    for field in openai_fields(params):
        if field in REQUIRED:
            continue
        known = field in IMPLEMENTED or field in NEUTRAL_FIELDS or field in NOT_IMPLEMENTED
        assert known, f"OpenAI's {field!r} is not placed: implement it, or list it as neutral or refused"
        engine = FakeEngine()
        client = TestClient(create_app(engine), raise_server_exceptions=False)
        if field in IMPLEMENTED:
            value, param, expected = (
                TEXT_IMPLEMENTED.get(field, IMPLEMENTED[field]) if "prompt" in base else (IMPLEMENTED[field])
            )
            extra = {"logprobs": True} if field == "top_logprobs" else {}
            extra |= {"tools": IMPLEMENTED["tools"][0]} if field == "tool_choice" else {}
            response = client.post(path, json={**base, field: value, **extra})
            assert response.status_code == 200, (field, response.text)
            if expected is ...:
                assert getattr(engine.params[0], param) is not None, field
            elif expected is not None:
                assert getattr(engine.params[0], param) == expected, field
        elif field in NEUTRAL_FIELDS:
            response = client.post(path, json={**base, field: NEUTRAL_VALUES.get(field, "x")})
            assert response.status_code == 200, (field, response.text)
        else:
            response = client.post(path, json={**base, field: NON_NEUTRAL[field]})
            assert response.status_code == 400, (field, response.text)
            error = response.json()["error"]
            assert error["param"] == field and field in error["message"], (field, error)
            assert engine.params == [], field  # nothing generated
