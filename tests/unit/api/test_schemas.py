"""Request validation and the sampling parameters requests resolve to."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from corolla.api.errors import validation_error
from corolla.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingParams
from helpers.tools import WEATHER_TOOL as WEATHER

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({**CHAT, **fields})


def rejection(cls: type, body: dict[str, object]) -> tuple[str | None, str]:
    """(param, message) of the 400 that ``body`` gets."""
    with pytest.raises(ValidationError) as caught:
        cls.model_validate(body)
    error = validation_error(caught.value.errors())
    assert error.status == 400 and error.type == "invalid_request_error"
    return error.param, error.message


def test_defaults_resolve_to_openai_defaults() -> None:
    assert chat().sampling() == SamplingParams(
        max_tokens=None, temperature=1.0, top_p=1.0, seed=None, stop=()
    )
    assert chat(temperature=None, top_p=None, stop=None, n=None).sampling() == chat().sampling()


def test_stop_as_a_string_or_a_list() -> None:
    assert chat(stop="\n").sampling().stop == ("\n",)
    assert chat(stop=["a", "bc", "a", ""]).sampling().stop == ("a", "bc")  # repeats and empties dropped


def test_known_fields_are_carried_and_neutral_ones_accepted() -> None:
    request = chat(max_tokens=7, temperature=0, top_p=0.5, seed=3, user="me", store=False, presence_penalty=0)
    assert request.sampling() == SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5, seed=3)
    assert request.refused() is None
    assert chat(max_completion_tokens=9).sampling().max_tokens == 9
    assert chat(max_completion_tokens=9, max_tokens=4).sampling().max_tokens == 4


def test_n_is_one_to_sixteen() -> None:
    assert chat(n=16).n == 16
    for n in (0, 17):
        param, message = rejection(ChatCompletionRequest, {**CHAT, "n": n})
        assert param == "n" and not message.startswith("Value error")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("max_tokens", -1),
        ("top_logprobs", 21),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", 5),
        ("seed", "x"),
    ],
)
def test_bad_parameters_name_their_field(field: str, value: object) -> None:
    param, message = rejection(ChatCompletionRequest, {**CHAT, field: value})
    assert param == field and message.startswith(f"{field}: ")


def test_messages_must_be_a_nonempty_conversation_of_known_roles() -> None:
    assert rejection(ChatCompletionRequest, {**CHAT, "messages": []})[0] == "messages"
    bad_role = {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}
    param, message = rejection(ChatCompletionRequest, bad_role)
    assert param == "messages" and message.startswith("messages.0.role: ")
    assert rejection(ChatCompletionRequest, {"messages": CHAT["messages"]})[0] == "model"


def test_message_content_as_text_parts_and_developer_role() -> None:
    request = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "you"}],
            },
            {"role": "assistant", "content": None},
        ]
    )
    assert [m.as_template_message() for m in request.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, you"},
        {"role": "assistant", "content": ""},
    ]


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "Hi", **fields})


def test_completion_prompts_are_text_or_token_ids_one_or_a_list() -> None:
    assert completion().prompts() == ["Hi"]
    assert completion(prompt=["Hi", "there"]).prompts() == ["Hi", "there"]
    assert completion(prompt=[5, 6, 7]).prompts() == [[5, 6, 7]]
    assert completion(prompt=[[5, 6, 7], [8]]).prompts() == [[5, 6, 7], [8]]  # lm-evaluation-harness's
    for prompt, why in (("", "prompt 0 is empty"), ([[]], "prompt 0 is empty"), (["a", ""], "prompt 1"),
                        ([], "got 0"), (["a"] * 33, "got 33")):  # fmt: skip
        param, message = rejection(CompletionRequest, {"model": "m", "prompt": prompt})
        assert param == "prompt" and why in message, (prompt, message)
    refused = completion(prompt=["a"] * 10, n=7).refused()
    assert refused is not None and refused.param == "n"


def test_logprobs_and_echo_resolve_to_sampling_params() -> None:
    assert chat(logprobs=True, top_logprobs=3).sampling().logprobs == 3
    assert chat(logprobs=True).sampling().logprobs == 0
    assert chat(logprobs=False, top_logprobs=None).sampling().logprobs is None
    refused = chat(top_logprobs=2).refused()
    assert refused is not None and refused.param == "top_logprobs" and "logprobs: true" in refused.message
    params = completion(logprobs=1, echo=True, max_tokens=0).sampling()
    assert (params.logprobs, params.echo, params.max_tokens) == (1, True, 0)
    assert completion(logprobs=1, echo=True, max_tokens=0).refused() is None
    assert (refused := completion(max_tokens=0).refused()) is not None and "echo" in refused.message
    assert (refused := chat(max_tokens=0).refused()) is not None and refused.param == "max_tokens"
    assert rejection(CompletionRequest, {"model": "m", "prompt": "Hi", "logprobs": 6})[0] == "logprobs"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("logit_bias", {"42": 100}),
        ("functions", [{"name": "f"}]),
        ("modalities", ["text", "audio"]),
        ("reasoning_effort", "high"),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(field: str, value: object) -> None:
    refused = chat(**{field: value}).refused()
    assert refused is not None and refused.param == field
    assert refused.message == f"{field}: not supported by this server"


@pytest.mark.parametrize(
    ("field", "value"),
    [("tools", []), ("tool_choice", "none"), ("response_format", {"type": "text"}), ("logit_bias", {}),
     ("frequency_penalty", 0), ("modalities", ["text"]), ("stream_options", {"include_usage": True})],
)  # fmt: skip
def test_not_implemented_fields_at_their_neutral_value_are_accepted(field: str, value: object) -> None:
    assert chat(**{field: value}).refused() is None


def test_unknown_fields_are_refused_as_openai_does() -> None:
    refused = chat(temprature=0).refused()
    assert refused is not None and refused.param == "temprature"
    assert refused.message == "unrecognized request argument supplied: temprature"
    text = CompletionRequest.model_validate({"model": "m", "prompt": "Hi", "best_of": 3, "echo": True})
    assert (refused := text.refused()) is not None and refused.param == "best_of"


def test_message_fields_that_would_change_the_answer_are_refused() -> None:
    named = chat(messages=[{"role": "user", "content": "Hi", "name": "bob"}]).refused()
    assert named is not None and named.param == "messages.0.name"
    audio = chat(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "audio": {"id": "x"}}])
    assert (refused := audio.refused()) is not None and refused.param == "messages.1.audio"
    assert chat(messages=[{"role": "assistant", "content": "Hi", "refusal": None}]).refused() is None




def test_tool_requests_are_checked() -> None:
    assert chat(tools=[WEATHER], tool_choice="required").must_call() == ["get_weather"]
    assert chat(tools=[WEATHER]).must_call() is None and chat(tools=[WEATHER]).calling_tools()
    assert not chat(tools=[WEATHER], tool_choice="none").calling_tools()
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert chat(tools=[WEATHER], tool_choice=named).must_call() == ["get_weather"]
    assert chat(tools=[WEATHER], tool_choice="required").sampling().grammar is not None  # constrained
    assert chat(tools=[WEATHER]).sampling().grammar is None
    for fields, param in (
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
        ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages.0.tool_call_id"),
    ):  # fmt: skip
        refused = chat(**fields).refused()
        assert refused is not None and refused.param == param, (fields, refused)
    param, _ = rejection(
        ChatCompletionRequest, {**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}
    )
    assert param == "tools"
