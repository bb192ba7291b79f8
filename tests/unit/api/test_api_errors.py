"""Exceptions -> status codes and OpenAI's error shape."""

from __future__ import annotations

import pytest

from corolla.api.errors import InvalidRequest, api_error, unknown_model, validation_error
from corolla.errors import ConfigError, MissingBlocks, RemoteError, ServerUnavailable, SwarmUnavailable


def test_error_shape() -> None:
    body = api_error(InvalidRequest("too long", param="messages", code="context_length_exceeded")).body()
    assert body == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (MissingBlocks([2, 3, 5], waited=5), 503, "service_unavailable"),
        (SwarmUnavailable("the DHT did not answer"), 503, "service_unavailable"),
        (ServerUnavailable("giving up"), 503, "service_unavailable"),
        (RemoteError("server ...abc: boom"), 502, "server_error"),
        (ConfigError("odd"), 502, "server_error"),
        (KeyError("bug"), 500, "server_error"),
    ],
)
def test_status_by_kind_of_error(error: Exception, status: int, kind: str) -> None:
    result = api_error(error)
    assert (result.status, result.type) == (status, kind)
    assert "\n" not in result.message and "Traceback" not in result.message


def test_missing_blocks_are_named() -> None:
    result = api_error(MissingBlocks([2, 3, 5], waited=5))
    assert result.code == "missing_blocks" and "block(s) 2-3, 5" in result.message


def test_multiline_messages_become_one_line() -> None:
    assert api_error(RemoteError("first\n  second")).message == "first second"


def test_unknown_model_names_the_available_ones() -> None:
    result = api_error(unknown_model("gpt-4", ["smollm2-135m"]))
    assert (result.status, result.param, result.code) == (400, "model", "model_not_found")
    assert "'gpt-4'" in result.message and "'smollm2-135m'" in result.message


def test_invalid_json_body() -> None:
    result = validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error"}])
    assert result.status == 400 and result.param is None and "not valid JSON" in result.message
