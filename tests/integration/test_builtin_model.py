"""The built-in SmolLM2 model through a real two-server swarm, driven by the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from corolla.config import BUILTIN_MODEL, default_cache_dir
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from helpers.tools import WEATHER_TOOL

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


def corolla(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corolla.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def builtin_dir() -> Path:
    from corolla.models.resolve import resolve_model

    return resolve_model(BUILTIN_MODEL, default_cache_dir()).path  # converts once, then cached


@pytest.fixture(scope="module")
def two_servers(builtin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalServer]]:
    servers = start_swarm(BUILTIN_MODEL, [(0, 15), (15, 30)], log_dir=tmp_path_factory.mktemp("builtin"))
    yield servers
    stop_all(servers)


def test_generate_answers_paris_with_the_local_token_ids(
    two_servers: list[LocalServer], builtin_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    result = corolla(
        "generate",
        QUESTION,
        "--initial_peers",
        two_servers[0].maddr or "",
        "--json",
        "--max_new_tokens",
        "24",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in answer["text"]
    assert [(hop["start"], hop["end"]) for hop in answer["route"]] == [(0, 15), (15, 30)]

    local = AutoModelForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32).eval()
    prompt_ids = torch.tensor([answer["prompt_ids"]])
    with torch.no_grad():
        expected = local.generate(prompt_ids, max_new_tokens=24, do_sample=False)
    assert answer["token_ids"] == expected[0, prompt_ids.shape[1] :].tolist()


def test_the_prompt_tuning_example_trains_through_the_swarm(two_servers: list[LocalServer]) -> None:
    example = Path(__file__).parents[2] / "examples" / "prompt_tuning.py"
    result = subprocess.run(
        [sys.executable, str(example), "--initial_peers", two_servers[0].maddr or "", "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = (
        float(line.split("loss ")[1].split(";")[0])
        for line in result.stdout.splitlines()
        if line.startswith(("before:", "after:"))
    )
    assert after < before  # three steps on the pirate answers already lower their loss
    assert "prompt tuning" in result.stderr  # the progress bar


JSON_PROMPTS = [
    "Give the capital of France as JSON.",
    "List three colours in JSON.",
    "A JSON object with a name and an age.",
    "Describe a cat as JSON.",
    "The weather today, as JSON.",
    "Your favourite book, in JSON.",
    "Two numbers and their sum as JSON.",
    "A recipe for tea as a JSON object.",
    "The planets you know, in JSON.",
    "A greeting in JSON.",
    "A person with a name and a city, as JSON.",
    "Three fruits and their colours in JSON.",
    "The days of the week as JSON.",
    "A book with a title and an author in JSON.",
    "A car with a make and a year, as JSON.",
    "Your name as a JSON object.",
    "A song with a title and an artist in JSON.",
    "The primary colours as JSON.",
    "A dog with a name and a breed, in JSON.",
    "A movie with a title and a year as JSON.",
]


@pytest.fixture(scope="module")
def api(two_servers: list[LocalServer]) -> Iterator[Any]:
    """``corolla api``'s app on the built-in model's swarm, in-process (FastAPI's test client)."""
    from fastapi.testclient import TestClient

    from corolla.api.app import create_app
    from corolla.api.engine import Engine

    engine = Engine.load(BUILTIN_MODEL, initial_peers=[two_servers[0].maddr or ""])
    yield TestClient(create_app(engine))
    engine.close()


def chat(api: Any, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    body = {"model": BUILTIN_MODEL, "messages": messages, "temperature": 0, "max_tokens": 32, **fields}
    reply = api.post("/v1/chat/completions", json=body).json()
    assert "choices" in reply, reply
    return dict(reply["choices"][0])


def test_structured_output_parses_and_matches_the_schema(api: Any) -> None:
    """Every json_object answer that ends parses, over 20 prompts answered at once (one cut short by
    max_tokens is the start of an object, as OpenAI's), and a json_schema answer is an object of
    that schema."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(content: str, response_format: dict[str, Any]) -> tuple[str, str]:
        choice = chat(api, [{"role": "user", "content": content}], response_format=response_format)
        return str(choice["message"]["content"]), str(choice["finish_reason"])

    with ThreadPoolExecutor(len(JSON_PROMPTS)) as pool:  # at once: the servers batch them
        answers = list(pool.map(lambda p: ask(p, {"type": "json_object"}), JSON_PROMPTS))
    ended = [text for text, reason in answers if reason == "stop"]
    assert all(isinstance(json.loads(text), dict) for text in ended), answers
    assert all(text.startswith("{") for text, _ in answers), answers
    assert len(ended) >= 5, answers  # 7 of 20 end within 32 tokens; the 135M model rambles on the rest
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    city_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    text, reason = ask(QUESTION, city_format)
    city = json.loads(text)
    assert reason == "stop" and set(city) == {"city", "country"} and "Paris" in city["city"], text




def test_an_agent_round_trip_calls_the_tool_then_answers_from_its_result(api: Any) -> None:
    """tool_choice "required": a valid get_weather call; the conversation with the tool's result
    then gets a text answer."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = chat(api, messages, tools=[WEATHER_TOOL], tool_choice="required")
    assert first["finish_reason"] == "tool_calls" and first["message"]["content"] is None, first
    (call,) = first["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 degrees Celsius."},
    ]
    # the final turn: the tools stay listed but none is to be called (the 135M model, offered the
    # tool again, tends to call it again)
    second = chat(api, messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=24)
    assert second["finish_reason"] in ("stop", "length") and second["message"]["content"], second
    assert "tool_calls" not in second["message"]
    assert "sunny" in second["message"]["content"].lower() or "21" in second["message"]["content"], second


def test_langchain_structured_output_returns_valid_objects_in_every_mode(api: Any) -> None:
    """LangChain's ``ChatOpenAI(...).with_structured_output(Model)``, unchanged, in its three modes:
    json_schema (its default), function_calling (a named tool) and json_mode (json_object)."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Capital(BaseModel):
        city: str
        country: str

    chat_model = ChatOpenAI(
        model=BUILTIN_MODEL, base_url=f"{api.base_url}/v1", api_key="anything", http_client=api,
        temperature=0, max_tokens=32, max_retries=0,
    )  # fmt: skip
    for method in ("json_schema", "function_calling", "json_mode"):
        # json_mode constrains to any object: the keys must come from the prompt, as with OpenAI
        keys = " Answer in JSON with keys city and country." if method == "json_mode" else ""
        prompt = QUESTION + keys
        answer = chat_model.with_structured_output(Capital, method=method).invoke(prompt)
        assert isinstance(answer, Capital) and "Paris" in answer.city, (method, answer)
