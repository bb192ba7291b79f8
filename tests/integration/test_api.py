"""``corolla api`` against a real swarm: a tiny chat model (a tokenizer with a chat template) served by
two real server processes, the API in-process and as the real command, and the official ``openai``
client. Answers are compared with local ``transformers`` greedy generation on the same directory."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import torch
import uvicorn
from hivemind.p2p import PeerID

from corolla.api.app import create_app
from corolla.api.engine import Engine
from corolla.cli.api import listen
from corolla.client.transport import call_info
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from helpers.models import save_tiny_chat_llama

NUM_BLOCKS = 4
CONTEXT = 1024  # the tiny model's positions; the servers allow more
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
T = TypeVar("T")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the built-in model's tokenizer (vocabulary 49152, chat template)."""
    return save_tiny_chat_llama(
        tmp_path_factory.mktemp("tiny_chat"),
        num_hidden_layers=NUM_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
    )


@pytest.fixture(scope="module")
def servers(
    model_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LocalServer]]:
    started = start_swarm(
        str(model_dir), [(0, 2), (2, NUM_BLOCKS)], initial_peers=[dht_peer.maddr or ""],
        log_dir=tmp_path_factory.mktemp("api_swarm"),
    )  # fmt: skip
    yield started
    stop_all(started)


@dataclass
class Api:
    url: str
    engine: Engine

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="anything", max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]


def serve_in_thread(engine: Engine) -> tuple[str, Callable[[], None]]:
    """Run the app with uvicorn on a free port in a background thread; returns (url, stop)."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, lambda started: started, timeout=20)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        sock.close()
        engine.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@pytest.fixture(scope="module")
def api(model_dir: Path, servers: list[LocalServer], dht_peer: LocalServer) -> Iterator[Api]:
    engine = Engine.load(str(model_dir), initial_peers=[dht_peer.maddr or ""], max_wait_for_blocks=10)
    url, stop = serve_in_thread(engine)
    yield Api(url, engine)
    stop()


@pytest.fixture(scope="module")
def client(api: Api) -> openai.OpenAI:
    return api.client()


@pytest.fixture(scope="module")
def local(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(model_dir), model


# ---------------------------------------------------------------- helpers


def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    seen = probe()
    while not ok(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = probe()
    return seen


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def local_greedy(local: tuple[Any, Any], ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    """What local transformers answers greedily: (text, new token ids)."""
    tokenizer, model = local
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
    new = out[0, len(ids) :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def ask(client: openai.OpenAI, model: str, content: str = "What is the capital of France?", **kw: Any) -> Any:
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=model, messages=messages, **kw)  # type: ignore[arg-type]


def streamed_text(stream: Any) -> tuple[str, Any]:
    """The text of a streamed chat answer and its last chunk."""
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1]


def peer_ids(servers: list[LocalServer]) -> list[str]:
    return [(s.maddr or "").rsplit("/p2p/", 1)[-1] for s in servers]


def active_sessions(engine: Engine, peer: str) -> int:
    manager = engine.manager
    return manager.loop.run(call_info(manager.p2p, PeerID.from_base58(peer)), timeout=10).active_sessions


def assert_route(route: list[dict[str, Any]], servers: list[LocalServer]) -> None:
    assert [hop["start"] for hop in route] == [0, 2] and [hop["end"] for hop in route] == [2, NUM_BLOCKS]
    assert [hop["peer_id"] for hop in route] == peer_ids(servers)


# ---------------------------------------------------------------- answers


def test_chat_completion_equals_local_greedy(
    client: openai.OpenAI, model_dir: Path, local: tuple[Any, Any], servers: list[LocalServer]
) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, *QUESTION]
    answer = client.chat.completions.create(
        model=str(model_dir),
        messages=messages,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    ids = chat_ids(local[0], messages)
    text, new = local_greedy(local, ids, 12)
    assert answer.choices[0].message.content == text and text
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), len(new))
    assert answer.usage.total_tokens == len(ids) + len(new)
    assert answer.choices[0].finish_reason == ("stop" if new[-1] == local[0].eos_token_id else "length")
    assert answer.object == "chat.completion" and answer.model == str(model_dir)
    assert_route(answer.model_extra["route"], servers)  # type: ignore[index]


def test_streamed_chat_assembles_to_the_greedy_text(
    client: openai.OpenAI, model_dir: Path, local: tuple[Any, Any], servers: list[LocalServer]
) -> None:
    text, last = streamed_text(ask(client, str(model_dir), max_tokens=12, temperature=0, stream=True))
    expected, new = local_greedy(local, chat_ids(local[0], QUESTION), 12)
    assert text == expected
    assert last.choices[0].finish_reason in ("stop", "length")
    assert last.usage.completion_tokens == len(new)
    assert_route(last.model_extra["route"], servers)


def test_text_completion_equals_local_greedy(
    client: openai.OpenAI, model_dir: Path, local: tuple[Any, Any]
) -> None:
    prompt = "The capital of France is"
    answer = client.completions.create(model=str(model_dir), prompt=prompt, max_tokens=10, temperature=0)
    ids = local[0](prompt).input_ids
    expected, new = local_greedy(local, ids, 10)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == expected
    assert answer.usage is not None and answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == len(new)


def local_logprobs(local: tuple[Any, Any], ids: list[int]) -> torch.Tensor:
    """Local transformers' log-probabilities at every position of ``ids`` (float32)."""
    with torch.no_grad():
        return torch.log_softmax(local[1](torch.tensor([ids])).logits[0].float(), dim=-1)


def test_chat_logprobs_equal_local_transformers(
    client: openai.OpenAI, model_dir: Path, local: tuple[Any, Any]
) -> None:
    """Each generated token's log-probability and the top 5 in its place, whole and streamed."""
    ids = chat_ids(local[0], QUESTION)
    _, new = local_greedy(local, ids, 6)
    expected = local_logprobs(local, ids + new)[len(ids) - 1 : -1]  # the positions that chose `new`
    vocabulary = [local[0].decode([i]) for i in range(expected.shape[-1])]
    answer = ask(client, str(model_dir), max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    chunks = list(ask(client, str(model_dir), max_tokens=6, temperature=0, logprobs=True, top_logprobs=5,
                      stream=True))  # fmt: skip
    scored_chunks = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    streamed = [entry for scored in scored_chunks for entry in scored.content]
    for content in (answer.choices[0].logprobs.content, streamed):
        assert len(content) == len(new)
        for entry, token, row in zip(content, new, expected, strict=True):
            assert entry.token == local[0].decode([token])
            assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
            assert entry.bytes == list(entry.token.encode())
            # the 5 most likely, best first, as local says (compared by value: near-ties may swap)
            values = row.topk(5).values.tolist()
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values, abs=1e-4)
            for alternative in entry.top_logprobs:  # each names a token with that log-probability
                ids_of = [i for i, text in enumerate(vocabulary) if text == alternative.token]
                assert any(abs(float(row[i]) - alternative.logprob) < 1e-4 for i in ids_of), alternative
    plain = ask(client, str(model_dir), max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_echo_scores_the_prompt_as_lm_evaluation_harness_asks(
    client: openai.OpenAI, model_dir: Path, local: tuple[Any, Any]
) -> None:
    """Token ids in, ``echo`` with ``logprobs=1`` and no new token: the prompt's log-probabilities
    (the first token has none), each with the most likely token in its place."""
    ids = local[0]("The capital of France is Paris").input_ids
    expected = local_logprobs(local, ids)
    answer = client.completions.create(
        model=str(model_dir), prompt=[ids], max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    scored = answer.choices[0].logprobs
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0
    assert scored.tokens == [local[0].decode([i]) for i in ids]
    assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert scored.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        best = int(expected[i - 1].argmax())
        assert scored.top_logprobs[i][local[0].decode([best])] == pytest.approx(
            float(expected[i - 1, best]), abs=1e-4
        )
    assert answer.choices[0].text == local[0].decode(ids, skip_special_tokens=True)
    more = client.completions.create(model=str(model_dir), prompt=ids, max_tokens=3, echo=True, temperature=0)
    assert more.choices[0].text.startswith(answer.choices[0].text) and more.usage.completion_tokens == 3


def test_models_list_the_model_while_the_swarm_covers_it(client: openai.OpenAI, model_dir: Path) -> None:
    ids = wait_for(lambda: [m.id for m in client.models.list()], lambda ids: bool(ids))
    assert ids == [str(model_dir)]


def test_stop_strings_end_the_answer_before_them(
    client: openai.OpenAI, model_dir: Path, local: tuple[Any, Any]
) -> None:
    full, _ = local_greedy(local, chat_ids(local[0], QUESTION), 16)
    start = next(k for k in range(3, len(full) - 2) if full.find(full[k : k + 2]) == k)
    stop = full[start : start + 2]
    answer = ask(client, str(model_dir), max_tokens=16, temperature=0, stop=[stop, "\x00never"])
    assert answer.choices[0].message.content == full[:start]
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens < 16
    text, last = streamed_text(
        ask(client, str(model_dir), max_tokens=16, temperature=0, stop=stop, stream=True)
    )
    assert text == full[:start] and last.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: openai.OpenAI, model_dir: Path) -> None:
    def sample(seed: int) -> str:
        answer = ask(client, str(model_dir), max_tokens=8, temperature=1.0, top_p=0.9, seed=seed)
        return answer.choices[0].message.content or ""

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_concurrent_requests_are_answered_as_alone(client: openai.OpenAI, model_dir: Path) -> None:
    questions = ["Hi", "What is 2+2?", "Name a colour.", "Tell me a joke."]

    def answer(question: str) -> str:
        return (
            ask(client, str(model_dir), question, max_tokens=8, temperature=0).choices[0].message.content
            or ""
        )

    alone = [answer(q) for q in questions]
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(answer, questions))
    assert together == alone


def leave_mid_stream(http: httpx.Client, url: str, request: dict[str, Any], busy: Callable[[], Any]) -> Any:
    """Read three pieces of a streamed answer, see the servers busy, then close the connection unread."""
    with http.stream("POST", url, json={**request, "stream": True}) as response:
        assert response.status_code == 200
        pieces = 0
        for line in response.iter_lines():
            pieces += '"content"' in line
            if pieces >= 3:
                break
        return busy()


def leave_while_waiting(
    http: httpx.Client, url: str, request: dict[str, Any], busy: Callable[[], Any]
) -> Any:
    """Ask for a whole answer but give up after two seconds (the connection is closed)."""
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http.post, url, json=request, timeout=2.0)
        seen = wait_for(busy, lambda n: n == [1, 1], 5)
        with pytest.raises(httpx.ReadTimeout):
            waiting.result()
    return seen


@pytest.mark.parametrize("leave", [leave_mid_stream, leave_while_waiting])
def test_a_client_leaving_ends_the_session_on_the_servers(
    api: Api, model_dir: Path, servers: list[LocalServer], leave: Callable[..., Any]
) -> None:
    peers = peer_ids(servers)

    def sessions() -> list[int]:
        return [active_sessions(api.engine, peer) for peer in peers]

    generated_before = api.metric("corolla_api_generated_tokens_total")
    request = {"model": str(model_dir), "messages": QUESTION, "max_tokens": 900, "temperature": 0}
    with httpx.Client(timeout=30) as http:
        assert leave(http, f"{api.url}/v1/chat/completions", request, sessions) == [1, 1]
    # the API notices, cancels the generation and leaves the session: both servers close it
    assert wait_for(sessions, lambda n: n == [0, 0], 10) == [0, 0]
    generated = wait_for(
        lambda: api.metric("corolla_api_generated_tokens_total"), lambda n: n > generated_before, 10
    )
    assert 1 <= generated - generated_before < 900  # stopped early, not finished


def test_swarm_view(api: Api, model_dir: Path, servers: list[LocalServer]) -> None:
    view = httpx.get(f"{api.url}/api/swarm").json()
    assert view["model"] == str(model_dir) and view["complete"] is True
    assert view["num_blocks"] == NUM_BLOCKS and view["block_counts"] == [1] * NUM_BLOCKS
    assert sorted(s["peer_id"] for s in view["servers"]) == sorted(peer_ids(servers))
    assert {s["state"] for s in view["servers"]} == {"ONLINE"}


# ---------------------------------------------------------------- refusals


def test_unknown_model_is_a_bad_request(client: openai.OpenAI, model_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "gpt-4", max_tokens=2)
    assert caught.value.status_code == 400 and caught.value.code == "model_not_found"
    assert str(model_dir) in caught.value.message


def test_n_choices_and_a_list_of_prompts_are_served_concurrently_in_order(
    client: openai.OpenAI, model_dir: Path, local: tuple[Any, Any]
) -> None:
    """n=3 greedy choices are three copies of local's answer; n=3 sampled with a seed are three
    different reproducible ones; 4 prompts get 4 choices, each local's answer to its own prompt."""
    greedy = ask(client, str(model_dir), max_tokens=5, n=3, temperature=0)
    expected, _ = local_greedy(local, chat_ids(local[0], QUESTION), 5)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert [c.message.content for c in greedy.choices] == [expected] * 3
    sampled = [ask(client, str(model_dir), max_tokens=8, n=3, seed=11, temperature=1.5) for _ in range(2)]
    texts = [[c.message.content for c in answer.choices] for answer in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1
    prompts = ["The capital of France is", "One, two,", "Hello", "Once upon a time"]
    answer = client.completions.create(model=str(model_dir), prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for choice, prompt in zip(answer.choices, prompts, strict=True):
        assert choice.text == local_greedy(local, local[0](prompt).input_ids, 4)[0]
    assert answer.usage.prompt_tokens == sum(len(local[0](p).input_ids) for p in prompts)


def test_a_swarm_missing_blocks_is_503_naming_them(
    model_dir: Path, servers: list[LocalServer], dht_peer: LocalServer
) -> None:
    engine = Engine.load(
        str(model_dir),
        initial_peers=[dht_peer.maddr or ""],
        dht_prefix="nobody-serves-this",
        max_wait_for_blocks=1,
    )
    url, stop = serve_in_thread(engine)
    try:
        client = Api(url, engine).client()
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as caught:
                ask(client, str(model_dir), max_tokens=2, stream=stream)
            assert caught.value.status_code == 503
            assert f"block(s) 0-{NUM_BLOCKS - 1}" in caught.value.message
        assert client.models.list().data == []
        view = httpx.get(f"{url}/api/swarm").json()
        assert view["complete"] is False and view["uncovered_blocks"] == list(range(NUM_BLOCKS))
    finally:
        stop()


# ---------------------------------------------------------------- the command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_command_serves_the_swarm_and_stops_on_sigterm(
    model_dir: Path, servers: list[LocalServer], dht_peer: LocalServer, local: tuple[Any, Any]
) -> None:
    metrics_port = free_port()
    cmd = [sys.executable, "-m", "corolla.cli.api", str(model_dir), "--initial_peers", dht_peer.maddr or ""]
    cmd += ["--port", "0", "--metrics_port", str(metrics_port)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        match = re.search(r"base_url=(http://127\.0\.0\.1:\d+/v1)", banner)
        assert match, f"no banner: {banner!r}"
        client = openai.OpenAI(base_url=match.group(1), api_key="x", max_retries=0, timeout=60)
        answer = ask(client, str(model_dir), max_tokens=6, temperature=0)
        expected, _ = local_greedy(local, chat_ids(local[0], QUESTION), 6)
        assert answer.choices[0].message.content == expected
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'corolla_api_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in metrics
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert process.stdout.read() == ""  # the banner was the only line
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


MC_QUESTIONS = [
    ("The capital of France is", [" Paris", " Rome", " Berlin", " Madrid"], 0),
    ("Two plus two is", [" three", " four", " five", " six"], 1),
    ("The sky on a clear day is", [" green", " red", " blue", " black"], 2),
    ("Water freezes at zero degrees", [" Kelvin", " Fahrenheit", " Rankine", " Celsius"], 3),
    ("The largest planet is", [" Jupiter", " Mars", " Venus", " Mercury"], 0),
    ("A week has", [" five days", " seven days", " ten days", " two days"], 1),
]


def test_lm_evaluation_harness_scores_a_multiple_choice_task_as_it_does_locally(
    api: Api, model_dir: Path, tmp_path: Path
) -> None:
    """lm-evaluation-harness (released, unmodified) runs a multiple-choice task from a local jsonl
    through ``local-completions`` against the swarm with its default request settings (token-id
    prompts, echo, logprobs=1, max_tokens=1), and every answer's log-likelihood, and so the
    accuracy, equals its own ``hf`` model's on the same weights locally."""
    import json

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC_QUESTIONS
    ))  # fmt: skip
    (tmp_path / "corolla_mc.yaml").write_text(
        "task: corolla_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    tasks = TaskManager(include_path=str(tmp_path))

    def evaluate(model: str, model_args: str) -> tuple[float, list[float]]:
        results = simple_evaluate(
            model=model, model_args=model_args, tasks=["corolla_mc"], task_manager=tasks, log_samples=True
        )
        assert results is not None
        samples = sorted(results["samples"]["corolla_mc"], key=lambda s: s["doc_id"])
        scores = [float(resp[0][0]) for sample in samples for resp in sample["resps"]]
        return float(results["results"]["corolla_mc"]["acc,none"]), scores

    swarm_acc, swarm_scores = evaluate(
        "local-completions",
        f"model={model_dir},base_url={api.url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={model_dir},max_retries=1",
    )
    local_acc, local_scores = evaluate("hf", f"pretrained={model_dir},dtype=float32,device=cpu")
    assert len(swarm_scores) == sum(len(c) for _, c, _ in MC_QUESTIONS)
    assert swarm_scores == pytest.approx(local_scores, abs=1e-3)
    assert swarm_acc == local_acc
