"""The HTTP layer with a fake engine: shapes, streaming, error paths, metrics (no swarm, no processes)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from api_fakes import FakeEngine
from fastapi.testclient import TestClient

from corolla.api.app import create_app
from corolla.errors import MissingBlocks, RemoteError
from helpers.tools import WEATHER_TOOL as WEATHER

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


def client_for(engine: FakeEngine) -> TestClient:
    return TestClient(create_app(engine), raise_server_exceptions=False)


def events(response: Any) -> list[Any]:
    """The JSON payloads of a server-sent event stream (``[DONE]`` as a string)."""
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def assert_error(response: Any, status: int, kind: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind and error["param"] == param
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    return error


def test_chat_completion(engine: FakeEngine) -> None:
    body = client_for(engine).post("/v1/chat/completions", json={**CHAT, "max_tokens": 5}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!"},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert body["route"] == [
        {"peer_id": "12D3KooWpeerA", "start": 0, "end": 2},
        {"peer_id": "12D3KooWpeerB", "start": 2, "end": 4},
    ]
    assert engine.params[0].max_tokens == 5
    assert engine.messages == [[{"role": "user", "content": "Hi"}]]


def test_streamed_chat_completion(engine: FakeEngine) -> None:
    response = client_for(engine).post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response)
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello!"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks[:-1])
    last = chunks[-2]
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    assert last["usage"]["total_tokens"] == 7 and len(last["route"]) == 2
    assert all("route" not in c for c in chunks[:-2])


def test_text_completion_whole_and_streamed(engine: FakeEngine) -> None:
    client = client_for(engine)
    request = {"model": "fake-alias", "prompt": "one two", "stop": "x", "seed": 3}
    body = client.post("/v1/completions", json=request).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Hello!"
    assert body["usage"]["prompt_tokens"] == 2 and body["route"][0]["start"] == 0
    assert engine.params[0].stop == ("x",) and engine.params[0].seed == 3
    chunks = events(client.post("/v1/completions", json={**request, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Hello!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and "route" in chunks[-2]


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 0), ("n", 17), ("temperature", 3), ("top_p", 0), ("max_tokens", -1), ("stop", 7)],
)
def test_bad_parameters_are_400_in_openai_shape(engine: FakeEngine, field: str, value: object) -> None:
    response = client_for(engine).post("/v1/chat/completions", json={**CHAT, field: value})
    assert_error(response, 400, "invalid_request_error", field)
    assert engine.params == []  # nothing was generated


def test_n_choices_each_generated_with_its_own_seed(engine: FakeEngine) -> None:
    body = client_for(engine).post("/v1/chat/completions", json={**CHAT, "n": 3, "seed": 7}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "Hello!" for c in body["choices"])
    assert sorted(p.seed for p in engine.params) == [7, 8, 9]  # the choices differ, each reproducible
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}  # prompt once


def test_a_list_of_prompts_gets_its_choices_in_order_streamed_or_not(engine: FakeEngine) -> None:
    client = client_for(engine)
    request = {"model": "fake-model", "prompt": ["one", "one two", "one two three"], "n": 2}
    body = client.post("/v1/completions", json=request).json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert sorted(len(p) for p in engine.prompts) == [1, 1, 2, 2, 3, 3]
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == 18
    chunks = [c for c in events(client.post("/v1/completions", json={**request, "stream": True}))[:-1]]
    texts: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == dict.fromkeys(range(6), "Hello!")
    closing = [c for c in chunks if c["choices"][0].get("finish_reason")]
    assert len(closing) == 6 and [("usage" in c) for c in closing] == [False] * 5 + [True]


def test_unknown_model_is_400_naming_the_available_one(engine: FakeEngine) -> None:
    response = client_for(engine).post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"})
    error = assert_error(response, 400, "invalid_request_error", "model")
    assert error["code"] == "model_not_found" and "'fake-model'" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions",
         "unsupported_parameter"),
        ("/v1/chat/completions", {**CHAT, "frobnicate": 1}, "frobnicate", "unsupported_parameter"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi", "name": "x"}]},
         "messages.0.name", "unsupported_parameter"),
        ("/v1/completions", {"model": "fake-model", "prompt": "a", "suffix": "z"}, "suffix",
         "unsupported_parameter"),
    ],
)  # fmt: skip
def test_fields_this_server_cannot_honour_are_400_naming_them(
    engine: FakeEngine, path: str, body: dict[str, object], param: str, code: str
) -> None:
    for stream in (False, True):
        response = client_for(engine).post(path, json={**body, "stream": stream})
        error = assert_error(response, 400, "invalid_request_error", param)
        assert error["code"] == code and param in error["message"]
    assert engine.params == []  # nothing was generated


def test_a_model_is_retrieved_by_any_of_its_names(engine: FakeEngine) -> None:
    client = client_for(engine)
    for name in ("fake-model", "fake-alias"):
        card = client.get(f"/v1/models/{name}").json()
        assert (card["id"], card["object"], card["owned_by"]) == ("fake-model", "model", "corolla")
    error = assert_error(client.get("/v1/models/org/gpt-4"), 404, "invalid_request_error", "model")
    assert error["code"] == "model_not_found" and "'org/gpt-4'" in error["message"]


def test_malformed_bodies_are_400(engine: FakeEngine) -> None:
    client = client_for(engine)
    bad_json = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert_error(bad_json, 400, "invalid_request_error")
    assert_error(
        client.post("/v1/completions", json={"model": "fake-model"}), 400, "invalid_request_error", "prompt"
    )


def test_missing_blocks_are_503_streamed_or_not() -> None:
    engine = FakeEngine(error=MissingBlocks([4, 5], waited=1))
    client = client_for(engine)
    for stream in (False, True):
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        error = assert_error(response, 503, "service_unavailable")
        assert "block(s) 4-5" in error["message"] and error["code"] == "missing_blocks"


def test_a_failing_server_is_502_and_a_bug_is_500() -> None:
    failing = client_for(FakeEngine(error=RemoteError("server ...x: boom")))
    text = {"model": "fake-model", "prompt": "a"}
    assert_error(failing.post("/v1/completions", json=text), 502, "server_error")
    buggy = client_for(FakeEngine(error=ZeroDivisionError("oops")))
    error = assert_error(buggy.post("/v1/chat/completions", json=CHAT), 500, "server_error")
    assert error["message"] == "internal error: ZeroDivisionError: oops"


def test_models_listed_only_while_the_swarm_is_complete() -> None:
    listed = client_for(FakeEngine()).get("/v1/models").json()
    assert listed["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listed["data"]] == [
        ("fake-model", "model", "corolla")
    ]
    assert isinstance(listed["data"][0]["created"], int)
    assert client_for(FakeEngine(complete=False)).get("/v1/models").json() == {"object": "list", "data": []}


def test_swarm_page_and_unknown_paths(engine: FakeEngine) -> None:
    client = client_for(engine)
    assert client.get("/api/swarm").json()["complete"] is True
    page = client.get("/")
    assert page.status_code == 200 and "<title>corolla" in page.text
    assert client.get("/static/index.html").status_code == 200
    error = assert_error(client.get("/v2/nothing"), 404, "invalid_request_error")
    assert error["code"] == "not_found"
    assert assert_error(client.get("/v1/chat/completions"), 405, "invalid_request_error")["code"]


def test_metrics_count_requests_statuses_and_tokens(engine: FakeEngine) -> None:
    client = client_for(engine)
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json={**CHAT, "n": 0})
    engine.done.wait(5)
    text = client.get("/metrics").text
    assert 'corolla_api_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    assert 'corolla_api_requests_total{endpoint="/v1/chat/completions",status="400"} 1.0' in text
    assert "corolla_api_generated_tokens_total 3.0" in text
    assert "corolla_api_prompt_tokens_total 4.0" in text
    assert "corolla_api_active_requests 0.0" in text
    assert 'corolla_api_request_duration_seconds_count{endpoint="/v1/chat/completions"} 2.0' in text
    assert "corolla_api_time_to_first_token_seconds_count 1.0" in text


def test_each_app_has_its_own_registry() -> None:
    first, second = client_for(FakeEngine()), client_for(FakeEngine())
    first.post("/v1/chat/completions", json=CHAT)
    assert "corolla_api_generated_tokens_total 0.0" in second.get("/metrics").text




def test_an_answer_that_calls_a_tool_comes_back_as_tool_calls_whole_or_streamed() -> None:
    engine = FakeEngine(pieces=('{"name": "get_weather", ', '"arguments": {"city": "Paris"}}'))
    client = client_for(engine)
    body = client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER]}).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert engine.tools[0] == [WEATHER]
    chunks = events(client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER], "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1] if c["choices"]]
    assert not any("content" in d and d["content"] for d in deltas)  # a call is never streamed as text
    (streamed,) = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert streamed[0]["index"] == 0 and streamed[0]["function"]["name"] == "get_weather"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_with_tools_a_text_answer_stays_text_and_tool_choice_none_hides_them(engine: FakeEngine) -> None:
    client = client_for(engine)
    body = client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER]}).json()
    assert (
        body["choices"][0]["message"]["content"] == "Hello!"
        and "tool_calls" not in body["choices"][0]["message"]
    )
    chunks = events(client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER], "stream": True}))
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"])
        == "Hello!"
    )
    client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER], "tool_choice": "none"})
    assert engine.tools[-1] is None
