"""Thousands of malformed and random requests against one live server, through real hivemind P2P.

Every request must come back as a success or a typed, one-line error (never an internal error, never
a crashed handler); afterwards the server must be alive, back to its idle cache accounting, and still
generate exactly what local ``transformers`` does. The suite runs half the examples (``SCALE``);
``COROLLA_FUZZ_SCALE=1 pytest tests/integration/test_fuzz.py -s`` runs them all: 3,634 inputs
(from 2,700 generated examples; 131 distinct error messages) in 39 s on 2 cores, all answered with a
success or a typed error. The counts are printed (``-s``) and written to ``fuzz_summary.json`` in
the test's tmp dir."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import string
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corolla import AutoDistributedModelForCausalLM, errors
from corolla.client.transport import call_forward, call_info
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from corolla.protocol import codec
from corolla.protocol.messages import (
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    InferenceStep,
    Reply,
    ServerInfoReply,
    decode,
)

HIDDEN = 64  # the tiny model's hidden size
BLOCKS = 6
CACHE_TOKENS = 2048  # per block
MAX_LENGTH = 128  # --inference_max_length
MAX_BATCH = 256  # --max_batch_size (tokens per request)
Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse

SCALE = float(os.environ.get("COROLLA_FUZZ_SCALE", "0.5"))  # share of the full run's examples

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)

# what was tried, and what came back: filled by the fuzzers, checked and printed by the test
TRIED: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()


# --- the live server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    servers = start_swarm(
        str(tiny_gqa_dir),
        [(0, BLOCKS)],
        initial_peers=[dht_peer.maddr or ""],
        extra_args=[
            "--dht_prefix", "fuzz", "--attn_cache_tokens", str(CACHE_TOKENS),
            "--inference_max_length", str(MAX_LENGTH), "--max_batch_size", str(MAX_BATCH),
            "--step_timeout", "2", "--request_timeout", "10", "--throughput", "100",
        ],
        log_dir=tmp_path_factory.mktemp("fuzz"),
    )  # fmt: skip
    yield servers[0]
    stop_all(servers)


@pytest.fixture(scope="module")
def fuzz_client(fuzz_server: LocalServer, dht_peer: LocalServer, tiny_gqa_dir: Path):  # type: ignore[no-untyped-def]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[dht_peer.maddr], dht_prefix="fuzz"
    )
    yield model
    model.manager.shutdown()


# --- talking to it ------------------------------------------------------------------------------


MESSAGES: Counter[str] = Counter()  # error messages, numbers and quoted values blanked


def outcome(response: Response | None) -> str:
    """``ok``, the error's kind, or ``closed`` (the stream ended without a reply)."""
    if response is None:
        return "closed"
    reply = Reply.model_validate_json(response.metadata or b"{}")
    if reply.error is None:
        return "ok"
    assert "\n" not in reply.error.message, reply.error.message
    assert 0 < len(reply.error.message) < 1000, reply.error.message
    MESSAGES[re.sub(r"'[^']*'|\d+", "_", reply.error.message)[:80]] += 1
    return reply.error.kind


class Stream:
    """One stream RPC fed from a queue, read one response at a time."""

    def __init__(self, p2p: P2P, peer: PeerID, rpc: str) -> None:
        self.p2p, self.peer, self.rpc = p2p, peer, rpc
        self.outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self.responses: AsyncIterator[Response] | None = None

    async def _requests(self) -> AsyncIterator[Request]:
        while (item := await self.outbox.get()) is not None:
            yield item

    async def send(self, request: Request) -> None:
        if self.responses is None:
            self.responses = await self.p2p.iterate_protobuf_handler(
                self.peer, self.rpc, self._requests(), Response
            )
        self.outbox.put_nowait(request)

    async def receive(self, timeout: float = 15.0) -> Response | None:
        assert self.responses is not None
        try:
            return await asyncio.wait_for(anext(self.responses), timeout)
        except (StopAsyncIteration, ConnectionError):  # ended, or reset while we were still writing
            return None

    async def close(self) -> None:
        """End of stream from our side (the server sees the stream close)."""
        self.outbox.put_nowait(None)

    async def abort(self) -> None:
        """Drop the connection without ending the stream."""
        if self.responses is not None:
            await asyncio.wait_for(self.responses.aclose(), 5)  # type: ignore[attr-defined]


class Target:
    def __init__(self, model: Any) -> None:
        manager = model.manager
        self.loop, self.p2p = manager.loop, manager.p2p
        self.peer = manager.peer(manager.route()[0])
        self.hanging: list[Stream] = []

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return self.loop.run(coro, timeout=timeout)

    def call(self, rpc: str, request: Request) -> str:
        """One request on a stream RPC; its outcome."""

        async def go() -> str:
            stream = Stream(self.p2p, self.peer, rpc)
            await stream.send(request)
            try:
                return outcome(await stream.receive())
            finally:
                await stream.close()

        return self.record(rpc, self.run(go()))

    def unary(self, rpc: str, request: Request) -> str:
        response = self.run(self.p2p.call_protobuf_handler(self.peer, rpc, request, Response))
        if rpc == RPC_INFO and b'"error"' not in response.metadata:
            ServerInfoReply.model_validate_json(response.metadata)
            return self.record(rpc, "ok")
        return self.record(rpc, outcome(response))

    @staticmethod
    def record(rpc: str, kind: str) -> str:
        TRIED[rpc] += 1
        OUTCOMES[kind] += 1
        assert kind == "ok" or kind == "closed" or _is_typed(kind), f"{rpc}: untyped error {kind}"
        return kind


def _is_typed(kind: str) -> bool:
    cls = getattr(errors, kind, None)
    return isinstance(cls, type) and issubclass(cls, errors.CorollaError)


# --- strategies ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
ints = st.one_of(
    st.integers(-3, 10), st.sampled_from([BLOCKS, MAX_LENGTH, MAX_LENGTH + 1, 2**31, 2**63, -(2**63), 10**30])
)
FIELDS = [
    "protocol", "start", "end", "prompts", "active_adapter", "max_length", "batch_size", "session_id",
    "push_to", "position", "step_id", "open", "extra", "",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    """Metadata: raw bytes, random JSON, or ``base`` with fields dropped, added or replaced."""
    how = draw(st.integers(0, 9))
    if how == 0:
        return draw(st.binary(max_size=200))
    if how == 1:
        return json.dumps(draw(json_values)).encode()
    meta = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 3))):
        target = (
            meta["open"]
            if "open" in meta and isinstance(meta["open"], dict) and draw(st.booleans())
            else meta
        )
        key = draw(st.sampled_from(FIELDS))
        op = draw(st.sampled_from(["drop", "set-int", "set-any"]))
        if op == "drop":
            target.pop(key, None)
        elif op == "set-int":
            target[key] = draw(ints)
        else:
            target[key] = draw(json_values)
    return json.dumps(meta).encode()


def span_meta(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly a valid sub-span of the server's blocks, sometimes not."""
    if draw(st.integers(0, 4)):
        start = draw(st.integers(0, BLOCKS - 1))
        end = draw(st.integers(start + 1, BLOCKS))
    else:
        start = draw(st.sampled_from([0, 2, 5, 6, -1]))
        end = draw(st.sampled_from([3, 1, 7, 0, -2]))
    meta: dict[str, Any] = {"start": start, "end": end}
    if draw(st.integers(0, 7)) == 0:
        meta["protocol"] = draw(st.sampled_from([0, 2, -1]))
    if draw(st.integers(0, 7)) == 0:
        meta["active_adapter"] = draw(st.text(min_size=1, max_size=20))
    return meta


@st.composite
def tensor_protos(draw: st.DrawFn, batch: int | None = None, seq: int | None = None) -> runtime_pb2.Tensor:
    """A tensor for ``[batch, seq, HIDDEN]`` hidden states: valid, or wrong in one of many ways."""
    b = batch if batch is not None else draw(st.integers(1, 3))
    s = seq if seq is not None else draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["valid", "valid", "shape", "dtype", "nonfinite", "proto", "proto", "huge"]))
    if kind == "valid":
        return codec.pack(torch.randn(b, s, HIDDEN))
    if kind == "shape":
        dims = draw(st.lists(st.sampled_from([0, 1, 2, 3, HIDDEN - 1, HIDDEN, HIDDEN + 1]), max_size=4))
        while dims and torch.Size(dims).numel() > 20_000:
            dims.pop()
        return codec.pack(torch.randn(dims))
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8,
                                      torch.uint8, torch.bool, torch.int32]))  # fmt: skip
        return codec.pack((torch.randn(b, s, HIDDEN) * 3).to(dtype))
    if kind == "nonfinite":
        tensor = torch.randn(b, s, HIDDEN)
        index = draw(st.integers(0, tensor.numel() - 1))
        tensor.view(-1)[index] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        return codec.pack(tensor)
    if kind == "huge":  # a batch x length far beyond --max_batch_size (a real, decodable tensor)
        return codec.pack(torch.zeros(1, MAX_BATCH + draw(st.integers(1, 64)), HIDDEN))
    size = draw(
        st.lists(st.one_of(st.integers(0, 8), st.sampled_from([HIDDEN, 2**31, 2**32 - 1])), max_size=4)
    )
    return runtime_pb2.Tensor(
        buffer=draw(st.binary(max_size=600)),
        size=size,
        dtype=draw(
            st.sampled_from(
                [
                    "float32",
                    "float16",
                    "bfloat16",
                    "int64",
                    "bool",
                    "",
                    "object",
                    ">f4",
                    "complex64",
                    "float8_e4m3fn",
                ]
            )
            | st.text(max_size=10)
        ),  # fmt: skip
        compression=draw(st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5, 99])),
        requires_grad=draw(st.booleans()),
    )


def tensor_lists(count: int) -> st.SearchStrategy[list[runtime_pb2.Tensor]]:
    """Usually ``count`` tensors, sometimes fewer or more."""
    return st.integers(0, 9).flatmap(
        lambda n: (
            st.lists(tensor_protos(), min_size=count, max_size=count)
            if n < 7
            else st.lists(tensor_protos(), max_size=4)
        )
    )


# --- the fuzzers ----------------------------------------------------------------------------------


def fuzz_forward_and_backward(target: Target, examples: int) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(data=st.data(), backward=st.booleans())
    def run(data: st.DataObject, backward: bool) -> None:
        base = span_meta(data.draw)
        prompts = data.draw(st.integers(0, 5)) == 0
        if prompts:
            base["prompts"] = True
        count = 1 + backward + prompts
        tensors = data.draw(tensor_lists(count))
        if prompts and len(tensors) == count and data.draw(st.booleans()):  # plausible deep prompts
            blocks = base["end"] - base["start"]
            tensors[-1] = codec.pack(torch.randn(max(blocks, 0), data.draw(st.integers(1, 3)), 2, HIDDEN))
        metadata = data.draw(mutated(base))
        target.call(RPC_BACKWARD if backward else RPC_FORWARD, Request(metadata=metadata, tensors=tensors))

    run()


def fuzz_info_and_push(target: Target, examples: int) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(data=st.data(), info=st.booleans())
    def run(data: st.DataObject, info: bool) -> None:
        if info:
            metadata = data.draw(mutated({"protocol": 1}))
            target.unary(RPC_INFO, Request(metadata=metadata))
            return
        base = {"session_id": uuid.uuid4().hex, "step_id": data.draw(ints), "position": data.draw(ints)}
        metadata = data.draw(mutated(base))
        target.unary(RPC_PUSH, Request(metadata=metadata, tensors=data.draw(tensor_lists(1))))

    run()


@st.composite
def session_plans(draw: st.DrawFn) -> dict[str, Any]:
    meta = span_meta(draw)
    meta["max_length"] = draw(st.sampled_from([1, 8, 16, 32, 32, MAX_LENGTH, MAX_LENGTH + 1, 10**9, 0]))
    meta["batch_size"] = draw(st.sampled_from([1, 1, 1, 1, 2, 3, 0, MAX_BATCH + 1]))
    if draw(st.booleans()):
        meta["session_id"] = draw(st.text(string.hexdigits, min_size=1, max_size=70))
    if draw(st.integers(0, 5)) == 0:
        meta["push_to"] = {"peer_id": draw(st.text(max_size=60)), "session_id": uuid.uuid4().hex}
    steps = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "position": st.sampled_from(["next", "next", "next", "zero", "back", "ahead", "huge"]),
                    "tokens": st.sampled_from([1, 1, 1, 2, 4, 0]),
                    "batch": st.sampled_from(["same", "same", "same", "other"]),
                    "step_id": st.sampled_from(["next", "next", "next", "zero", "same", "old", "big"]),
                    "garbage": st.integers(0, 9),  # 0: a random tensor, 1: random metadata, 2: open again
                }
            ),
            min_size=1,
            max_size=6,
        )
    )
    end = draw(st.sampled_from(["eof", "eof", "eof", "abort", "abort", "hang"]))
    return {"open": meta, "steps": steps, "end": end, "hang": draw(st.integers(0, 19)) == 0}


def fuzz_inference(target: Target, examples: int) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(plan=session_plans(), data=st.data())
    def run(plan: dict[str, Any], data: st.DataObject) -> None:
        for spec in plan["steps"]:  # drawn here: hypothesis draws only in the thread that runs it
            spec["tensors"] = data.draw(tensor_lists(1)) if spec["garbage"] == 0 else None
            spec["metadata"] = (
                data.draw(mutated({"position": 0, "step_id": 1})) if spec["garbage"] == 1 else None
            )
        target.run(session(target, plan), timeout=120)

    run()


async def session(target: Target, plan: dict[str, Any]) -> None:
    """Steps of one inference stream, predicting which ones the server runs (a step id already seen is
    skipped silently); stops at the first error, as the server does."""
    stream = Stream(target.p2p, target.peer, RPC_INFERENCE)
    try:
        await _steps(target, stream, plan)
    finally:
        await stream.close()


async def _steps(target: Target, stream: Stream, plan: dict[str, Any]) -> None:
    open_meta = plan["open"]
    batch = open_meta["batch_size"] if 0 < open_meta["batch_size"] <= 3 else 1
    length, last_id = 0, -1
    for i, spec in enumerate(plan["steps"]):
        position = {"next": length, "zero": 0, "back": max(length - 1, 0), "ahead": length + 1,
                    "huge": 2**62}[spec["position"]]  # fmt: skip
        step_id = {"next": last_id + 1 if last_id >= 0 else 1, "zero": 0, "same": max(last_id, 0),
                   "old": max(last_id - 1, 0), "big": 2**62}[spec["step_id"]]  # fmt: skip
        b = batch if spec["batch"] == "same" else batch % 3 + 1
        meta: dict[str, Any] = {"position": position, "step_id": step_id}
        if i == 0 or spec["garbage"] == 2:
            meta["open"] = open_meta
        tensors = spec["tensors"] or [codec.pack(torch.randn(b, spec["tokens"], HIDDEN))]
        metadata = spec["metadata"] or json.dumps(meta).encode()
        await stream.send(Request(metadata=metadata, tensors=tensors))
        if i > 0 and _skipped(metadata, last_id):
            TRIED["inference step (a copy: no reply)"] += 1
            continue
        kind = Target.record(RPC_INFERENCE, outcome(await stream.receive()))
        if kind != "ok":
            return
        step = decode(InferenceStep, metadata)
        length, last_id = step.position + codec.unpack(tensors[0]).shape[1], step.step_id
    if plan["end"] == "hang" and plan["hang"]:
        target.hanging.append(stream)  # left open: the server drops it after --step_timeout
    elif plan["end"] == "abort":
        await stream.abort()


def _skipped(metadata: bytes, last_id: int) -> bool:
    """Whether the server skips this step as a copy of one it already ran."""
    try:
        step = decode(InferenceStep, metadata)
    except errors.BadRequest:
        return False
    return step.open is None and step.step_id != 0 and step.step_id <= last_id


def fuzz_pushes_into_a_live_session(target: Target, examples: int) -> None:
    """Random pushes into a real session never break it: its next client step gives exactly what a
    forward pass over the inputs it actually ran gives."""

    @settings(FUZZ, max_examples=examples)
    @given(
        pushes=st.lists(
            st.tuples(
                st.sampled_from(["mine", "mine", "other"]),
                st.sampled_from([0, 1, 2, 2, 3, 2**40]),
                st.sampled_from([0, 2, 4, 4, 5, 2**40]),
                st.integers(0, 3).flatmap(  # 0: a random tensor
                    lambda n: tensor_lists(1) if n == 0 else st.just([codec.pack(torch.randn(1, 1, HIDDEN))])
                ),
            ),
            max_size=4,
        ),
    )
    def run(pushes: list[tuple[str, int, int, list[runtime_pb2.Tensor]]]) -> None:
        target.run(live_session(target, pushes), timeout=120)

    run()


async def live_session(target: Target, pushes: list[tuple[str, int, int, list[runtime_pb2.Tensor]]]) -> None:
    stream = Stream(target.p2p, target.peer, RPC_INFERENCE)
    key = uuid.uuid4().hex
    opening = {"start": 0, "end": BLOCKS, "max_length": 16, "session_id": key}
    first = torch.randn(1, 4, HIDDEN)
    try:
        meta = {"position": 0, "step_id": 1, "open": opening}
        await stream.send(Request(metadata=json.dumps(meta).encode(), tensors=[codec.pack(first)]))
        assert Target.record(RPC_INFERENCE, outcome(await stream.receive())) == "ok"
        inputs, last_id, ran = first, 1, 0  # what the session ran (position by position), as the server does
        for whose, step_id, position, tensors in pushes:
            meta = {"session_id": key if whose == "mine" else uuid.uuid4().hex, "step_id": step_id,
                    "position": position}  # fmt: skip
            request = Request(metadata=json.dumps(meta).encode(), tensors=tensors)
            response = await target.p2p.call_protobuf_handler(target.peer, RPC_PUSH, request, Response)
            if (
                target.record(RPC_PUSH, outcome(response)) == "ok"
                and whose == "mine"
                and step_id == last_id + 1
            ):
                inputs = torch.cat(
                    [inputs[:, :position], codec.unpack(tensors[0])], 1
                )  # run as the next step
                last_id, ran = step_id, ran + 1
        for _ in range(ran):  # the replies to the pushed steps come on the client's stream
            assert Target.record(RPC_INFERENCE, outcome(await stream.receive())) == "ok"
        mine = torch.randn(1, 1, HIDDEN)
        meta = {"position": inputs.shape[1], "step_id": last_id + 1}
        await stream.send(Request(metadata=json.dumps(meta).encode(), tensors=[codec.pack(mine)]))
        response = await stream.receive()
        assert Target.record(RPC_INFERENCE, outcome(response)) == "ok"
    finally:
        await stream.close()
    expected = await call_forward(target.p2p, target.peer, 0, BLOCKS, torch.cat([inputs, mine], 1))
    torch.testing.assert_close(codec.unpack(response.tensors[0]), expected[:, -1:], atol=1e-4, rtol=1e-4)


def fuzz_raw_streams(target: Target, examples: int) -> None:
    """Bytes that are not hivemind's framing at all, or a frame that declares a huge length."""

    @settings(FUZZ, max_examples=examples)
    @given(
        rpc=st.sampled_from([RPC_FORWARD, RPC_INFERENCE, RPC_BACKWARD]),
        payload=st.one_of(
            st.binary(max_size=300),
            st.builds(
                lambda n, tail: P2P.MESSAGE_MARKER + n.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + tail,
                st.sampled_from([0, 1, 100, 2**40, 2**63]),
                st.binary(max_size=2000),
            ),
        ),  # fmt: skip
    )
    def run(rpc: str, payload: bytes) -> None:
        async def go() -> bool:
            """Whether the server closed the stream by itself (not waiting for more bytes)."""
            _, reader, writer = await target.p2p.call_binary_stream_handler(target.peer, rpc)
            try:
                writer.write(payload)
                await writer.drain()
                await asyncio.wait_for(reader.read(), 1.0)
                return True
            except TimeoutError:
                return False  # a frame still incomplete: the server waits, and we hang up
            finally:
                writer.close()

        closed = target.run(go())
        TRIED["raw stream"] += 1
        if payload[:1] == P2P.MESSAGE_MARKER and int.from_bytes(payload[1:9], P2P.BYTEORDER) >= 2**40:
            assert closed, "a frame declaring a huge length must be refused before it is read"

    run()


# --- the test -------------------------------------------------------------------------------------


def wait_until_idle(target: Any, idle_cache_tokens: int, when: str, seconds: float = 15.0) -> None:
    """Poll the server until it holds no session and all its cache is free again."""
    deadline = time.monotonic() + seconds
    while True:
        info = target.run(call_info(target.p2p, target.peer))
        if (info.active_sessions, info.cache_tokens_left) == (0, idle_cache_tokens):
            return
        assert time.monotonic() < deadline, f"not back to idle {when}: {info}"
        time.sleep(0.2)


def test_malformed_requests_never_take_the_server_down(
    fuzz_server: LocalServer, fuzz_client, local_model, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    target = Target(fuzz_client)
    idle = target.run(call_info(target.p2p, target.peer))
    assert idle.active_sessions == 0
    t0 = time.monotonic()
    fuzz_forward_and_backward(target, round(900 * SCALE))
    fuzz_info_and_push(target, round(600 * SCALE))
    fuzz_inference(target, round(900 * SCALE))
    fuzz_pushes_into_a_live_session(target, round(200 * SCALE))
    fuzz_raw_streams(target, round(100 * SCALE))
    fuzz_time = time.monotonic() - t0

    # the oversized frame was refused before it was read: the server closed the stream at once
    assert "more than the" in fuzz_server.log_path.read_text()
    for stream in target.hanging:  # dropped by the server after --step_timeout 2 s
        target.run(stream.close())
    wait_until_idle(target, idle.cache_tokens_left, "after the fuzzing")
    assert fuzz_server.process.poll() is None

    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = local_model.generate(ids, max_new_tokens=16, do_sample=False)
        got = fuzz_client.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expected)
    wait_until_idle(target, idle.cache_tokens_left, "after the generation")  # its stream closes late

    log = fuzz_server.log_path.read_text()
    assert "Handler failed with the exception" not in log  # no handler let an exception escape
    assert " failed\n" not in log and "InternalError" not in log
    summary = {
        "inputs_tried": sum(TRIED.values()),
        "by_rpc": dict(TRIED),
        "outcomes": dict(OUTCOMES),
        "errors": dict(MESSAGES.most_common()),
        "seconds": round(fuzz_time, 1),
    }
    (tmp_path / "fuzz_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nfuzz: {json.dumps({k: v for k, v in summary.items() if k != 'errors'})}")
    print(f"fuzz: {len(MESSAGES)} distinct errors, the most common: {MESSAGES.most_common(8)}")
    assert OUTCOMES["InternalError"] == 0
    assert sum(TRIED.values()) >= 2000 * SCALE
