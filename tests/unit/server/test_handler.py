"""The RPC handler over a fake backend: what it refuses, and that a session's cache is released on
every way out (no processes, no network: the handler's coroutines are driven directly)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from transformers import DynamicCache

from corolla.config import LimitsConfig
from corolla.protocol import codec
from corolla.protocol.messages import Reply
from corolla.runtime.kv_cache import CacheBudget
from corolla.server.handler import Handler, Hosting
from corolla.server.sessions import SessionTable

HIDDEN = 8
BLOCKS = 4
Request = runtime_pb2.ExpertRequest
PEERS = [
    PeerID.from_base58("QmYA3KRfQV2VU87XK7w5ftaKa88HbvL9zz58jzjDkEVBCw"),
    PeerID.from_base58("QmTXfruvh6eyGRkCjMyBeQDTa37Y5yeeRX9oeFzfG5seG5"),
]


class FakeBackend:
    """Doubles its input; ``gate`` (if set) holds every run until it is set."""

    start, end, dtype, quant_type, tp_devices = 0, BLOCKS, torch.float32, "none", ()
    adapters: tuple[str, ...] = ()
    weight_bytes = batched_steps = decode_passes = 0
    compute_seconds = 0.0
    decode_threads = 2

    def __init__(self) -> None:
        self.runs = 0
        self.gate: asyncio.Event | None = None

    def new_cache(self, max_length: int | None = None) -> DynamicCache:
        return DynamicCache()

    async def run(
        self, hidden: torch.Tensor, start: int, end: int, cache: Any = None, **_: Any
    ) -> torch.Tensor:
        if self.gate is not None:
            await self.gate.wait()
        self.runs += 1
        return hidden * 2

    def crop(self, cache: Any, length: int) -> None:
        pass


def make_handler(**limits: Any) -> tuple[Handler, FakeBackend, SessionTable]:
    handler = Handler(LimitsConfig(**limits), dht_prefix="test", hidden_size=HIDDEN)
    backend = FakeBackend()
    sessions = SessionTable(CacheBudget(64 * BLOCKS))
    handler.hosting = Hosting(backend, sessions)  # type: ignore[arg-type]
    return handler, backend, sessions


def context(peer: int = 0) -> Any:
    return SimpleNamespace(remote_id=PEERS[peer], local_id=PEERS[1 - peer])


def step(position: int, step_id: int = 0, tokens: int = 1, *, hidden: torch.Tensor | None = None, **meta: Any
         ) -> Request:  # fmt: skip
    hidden = torch.ones(1, tokens, HIDDEN) if hidden is None else hidden
    body = {"position": position, "step_id": step_id, **meta}
    return Request(metadata=json.dumps(body).encode(), tensors=[codec.pack(hidden)])


def opening(max_length: int = 16, **extra: Any) -> dict[str, Any]:
    return {"open": {"start": 0, "end": BLOCKS, "max_length": max_length, **extra}}


def kind(response: runtime_pb2.ExpertResponse) -> str:
    reply = Reply.model_validate_json(response.metadata or b"{}")
    return "ok" if reply.error is None else f"{reply.error.kind}: {reply.error.message}"


class Client:
    """An inference stream driven by hand: ``send`` requests, ``receive`` replies."""

    def __init__(self, handler: Handler, peer: int = 0) -> None:
        self.inbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self.replies = handler.rpc_inference(self._requests(), context(peer))

    async def _requests(self) -> AsyncIterator[Request]:
        while (item := await self.inbox.get()) is not None:
            yield item

    def send(self, request: Request | None) -> None:
        self.inbox.put_nowait(request)

    async def receive(self) -> str:
        return kind(await asyncio.wait_for(anext(self.replies), 5))


def test_a_bad_step_ends_the_session_and_releases_its_cache() -> None:
    async def main() -> None:
        handler, _, sessions = make_handler()
        client = Client(handler)
        client.send(step(0, 1, 4, **opening()))
        assert await client.receive() == "ok"
        assert (len(sessions), sessions.budget.used) == (1, 16 * BLOCKS)
        client.send(step(9, 2))  # beyond the 4 tokens it holds
        assert (
            await client.receive()
            == "BadRequest: step starts at position 9 but the session holds only 4 tokens"
        )
        assert (len(sessions), sessions.budget.used) == (0, 0)  # released before the error is sent
        await client.replies.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (step(4, 2, **opening()), "only the first message of an inference stream may carry 'open'"),
        (step(4, 2, hidden=torch.full((1, 1, HIDDEN), float("nan"))), "hidden states contain NaN"),
        (step(4, 2, hidden=torch.ones(1, 1, HIDDEN).double()), "must be float32, bfloat16 or float16"),
        (step(4, 2, hidden=torch.ones(2, 1, HIDDEN)), "step has batch size 2, the session was opened with 1"),
        (step(2**62, 2), "step starts at position 4611686018427387904 but the session holds only 4"),
        (step(4, 2, tokens=13), "would exceed its max_length 16 (4 + 13 tokens)"),
        (Request(metadata=b'{"position": 4, "step_id": 2, "x": 1}'), "x: Extra inputs are not permitted"),
        (Request(metadata=b'{"position": -1}', tensors=[codec.pack(torch.ones(1, 1, 8))]), "position: Input"),
        (Request(metadata=b"\xff\xfe", tensors=[]), "malformed InferenceStep: message: Invalid JSON"),
        (Request(metadata=b'{"position": 4}', tensors=[runtime_pb2.Tensor(size=[1, 1, 8], dtype="float32")]),
         "cannot decode tensor: buffer: shape [1, 1, 8] of float32 needs 32 bytes, got 0"),
    ],
    ids=["open-again", "nan", "float64", "batch", "huge-position", "too-long", "extra-field", "negative",
         "not-json", "empty-buffer"],
)  # fmt: skip
def test_each_bad_step_gets_a_typed_one_line_error(bad: Request, message: str) -> None:
    async def main() -> None:
        handler, backend, sessions = make_handler()
        client = Client(handler)
        client.send(step(0, 1, 4, **opening()))
        assert await client.receive() == "ok"
        client.send(bad)
        reply = await client.receive()
        assert reply.startswith("BadRequest: ") and message in reply and "\n" not in reply, reply
        assert (len(sessions), sessions.budget.used, backend.runs) == (0, 0, 1)
        await client.replies.aclose()

    asyncio.run(main())


def test_a_client_that_goes_away_mid_step_leaves_nothing_behind() -> None:
    async def main() -> None:
        handler, backend, sessions = make_handler()
        client = Client(handler)
        client.send(step(0, 1, 4, **opening()))
        assert await client.receive() == "ok"
        backend.gate = asyncio.Event()  # the next step hangs in the compute thread
        client.send(step(4, 2))
        pending = asyncio.ensure_future(client.receive())
        await asyncio.sleep(0.05)
        assert len(sessions) == 1
        pending.cancel()  # hivemind cancels the handler when the connection drops
        with pytest.raises(asyncio.CancelledError):
            await pending
        await client.replies.aclose()
        assert (len(sessions), sessions.budget.used) == (0, 0)

    asyncio.run(main())


def test_an_idle_session_is_dropped_after_the_step_timeout_and_released() -> None:
    async def main() -> None:
        handler, _, sessions = make_handler(step_timeout=0.2)
        client = Client(handler)
        client.send(step(0, 1, 4, **opening()))
        assert await client.receive() == "ok"
        reply = await client.receive()  # nothing sent: the server gives up
        assert reply == (
            "ServerUnavailable: no request within 0.2 s (--step_timeout/--request_timeout): "
            "the stream was closed"
        )
        assert (len(sessions), sessions.budget.used) == (0, 0)
        await client.replies.aclose()

    asyncio.run(main())


def test_a_client_closing_its_stream_releases_the_session() -> None:
    async def main() -> None:
        handler, _, sessions = make_handler()
        client = Client(handler)
        client.send(step(0, 1, 4, **opening()))
        assert await client.receive() == "ok"
        client.send(None)
        with pytest.raises(StopAsyncIteration):
            await anext(client.replies)
        assert (len(sessions), sessions.budget.used) == (0, 0)

    asyncio.run(main())


def test_garbage_pushes_are_refused_and_never_end_the_session() -> None:
    async def main() -> None:
        handler, backend, sessions = make_handler()
        client = Client(handler)
        client.send(step(0, 1, 4, **opening(session_id="s1")))
        assert await client.receive() == "ok"

        async def push(meta: dict[str, Any], tensors: list[runtime_pb2.Tensor]) -> str:
            request = Request(metadata=json.dumps(meta).encode(), tensors=tensors)
            return kind(await handler.rpc_push(request, context(1)))

        one = [codec.pack(torch.ones(1, 1, HIDDEN))]
        assert "needs a step_id above 0" in await push({"session_id": "s1", "step_id": 0, "position": 4}, one)
        assert "no session 'nope'" in await push({"session_id": "nope", "step_id": 2, "position": 4}, one)
        assert "a push carries 1 tensor" in await push({"session_id": "s1", "step_id": 2, "position": 4}, [])
        assert "NaN" in await push(
            {"session_id": "s1", "step_id": 2, "position": 4},
            [codec.pack(torch.full((1, 1, HIDDEN), float("inf")))],
        )
        assert "holds only 4 tokens" in await push({"session_id": "s1", "step_id": 2, "position": 7}, one)
        assert "not the next step" in await push({"session_id": "s1", "step_id": 5, "position": 4}, one)
        assert (
            await push({"session_id": "s1", "step_id": 1, "position": 0}, one) == "ok"
        )  # already ran: dropped
        assert (backend.runs, len(sessions)) == (1, 1)

        assert await push({"session_id": "s1", "step_id": 2, "position": 4}, one) == "ok"
        assert await client.receive() == "ok"  # the pushed step ran; its reply goes to the client
        client.send(step(4, 2))  # the client's own copy: skipped
        client.send(step(5, 3))
        assert await client.receive() == "ok"
        # delivered pushes count, the late copy of step 1 included
        assert (backend.runs, handler.pushes_received, sessions.budget.used) == (3, 2, 16 * BLOCKS)
        client.send(None)
        with pytest.raises(StopAsyncIteration):
            await anext(client.replies)
        assert (len(sessions), sessions.budget.used) == (0, 0)

    asyncio.run(main())


def test_open_checks_batch_size_session_id_push_target_and_adapter_before_reserving() -> None:
    async def main() -> None:
        handler, _, sessions = make_handler(max_batch_size=4)
        first = Client(handler)
        first.send(step(0, 1, **opening(session_id="taken")))
        assert await first.receive() == "ok"
        cases = [
            (opening(batch_size=5), "batch_size 5 exceeds this server's --max_batch_size 4"),
            (opening(session_id="taken"), "session_id 'taken' is already in use on this server"),
            (opening(push_to={"peer_id": "not-a-peer", "session_id": "x"}), "'not-a-peer' is not a peer id"),
            (opening(active_adapter="lora"), "adapter 'lora' is not served here; served adapters: none"),
            (opening(max_length=10**6), "exceeds this server's --inference_max_length"),
            (
                {"open": {"start": 2, "end": 9, "max_length": 4}},
                "blocks 2:9 are not inside this server's span 0:4",
            ),
        ]
        for meta, message in cases:
            client = Client(handler)
            client.send(step(0, 1, **meta))
            reply = await client.receive()
            assert reply.startswith("BadRequest: ") and message in reply, reply
            await client.replies.aclose()
        assert (len(sessions), sessions.budget.used) == (1, 16 * BLOCKS)
        await first.replies.aclose()
        assert sessions.budget.used == 0

    asyncio.run(main())


def test_sessions_per_peer_are_limited_and_the_waiting_open_gets_room_when_one_closes() -> None:
    async def main() -> None:
        handler, _, sessions = make_handler(max_sessions_per_peer=2, max_alloc_timeout=5.0)
        mine = [Client(handler, peer=0) for _ in range(3)]
        for client in mine[:2]:
            client.send(step(0, 1, **opening(max_length=24)))  # 24 x 4 of the 64 x 4 budget each
            assert await client.receive() == "ok"
        mine[2].send(step(0, 1, **opening(max_length=8)))
        assert "its --max_sessions_per_peer 2 allows" in await mine[2].receive()
        other = Client(handler, peer=1)
        other.send(step(0, 1, **opening(max_length=24)))  # does not fit yet: waits for room
        waiting = asyncio.ensure_future(other.receive())
        await asyncio.sleep(0.1)
        assert not waiting.done() and sessions.budget.waiting == 1
        mine[0].send(None)  # a session closes: the waiter gets its room
        with pytest.raises(StopAsyncIteration):
            await anext(mine[0].replies)
        assert await asyncio.wait_for(waiting, 2) == "ok"
        assert sessions.sessions_of(PEERS[1].to_base58()) == 1
        for client in [*mine, other]:
            await client.replies.aclose()
        assert (len(sessions), sessions.budget.used) == (0, 0)

    asyncio.run(main())


def test_forward_refuses_bad_inputs_before_computing() -> None:
    async def main() -> None:
        handler, backend, _ = make_handler()

        async def forward(meta: dict[str, Any], *tensors: torch.Tensor) -> str:
            request = Request(metadata=json.dumps(meta).encode(), tensors=[codec.pack(t) for t in tensors])

            async def requests() -> AsyncIterator[Request]:
                yield request

            replies = handler.rpc_forward(requests(), context())
            try:
                return kind(await anext(replies))
            finally:
                await replies.aclose()  # the caller hangs up: the handler stops lingering

        span = {"start": 0, "end": BLOCKS}
        assert await forward(span, torch.ones(1, 3, HIDDEN)) == "ok"
        assert "NaN" in await forward(span, torch.tensor(float("nan")).expand(1, 3, HIDDEN).clone())
        assert "adapter 'x' is not served" in await forward(
            {**span, "active_adapter": "x"}, torch.ones(1, 3, HIDDEN)
        )
        assert "batch x prefix at most --max_batch_size" in await forward(
            {**span, "prompts": True}, torch.ones(1, 3, HIDDEN), torch.ones(BLOCKS, 1, 9000, HIDDEN)
        )
        assert backend.runs == 1

    asyncio.run(main())


def test_a_stream_probe_says_what_the_server_has_of_the_callers_session() -> None:
    async def state(handler: Handler, session_id: str, peer: int = 0) -> dict[str, Any]:
        request = Request(metadata=json.dumps({"session_id": session_id}).encode())
        response = await handler.rpc_ping(request, context(peer))
        return json.loads(response.metadata or b"{}")

    async def main() -> None:
        handler, backend, sessions = make_handler(max_alloc_timeout=5.0)
        assert (await handler.rpc_ping(Request(), context())).metadata == b""  # a plain ping: as before
        assert await state(handler, "s1") == {}  # not known (all fields at their defaults)
        backend.gate = asyncio.Event()
        client = Client(handler)
        client.send(step(0, 1, **opening(max_length=16, session_id="s1")))
        reply = asyncio.ensure_future(client.receive())
        await asyncio.sleep(0.1)
        assert await state(handler, "s1") == {"known": True, "received": 1}  # running its first step
        assert await state(handler, "s1", peer=1) == {}  # another peer learns nothing of it
        backend.gate.set()
        assert await reply == "ok"
        assert await state(handler, "s1") == {"known": True, "received": 1, "done": 1}
        big = Client(handler, peer=1)  # does not fit beside s1: waits for room, and is known meanwhile
        big.send(step(0, 4, **opening(max_length=60, session_id="s2")))
        waiting = asyncio.ensure_future(big.receive())
        await asyncio.sleep(0.1)
        assert await state(handler, "s2", peer=1) == {"known": True, "received": 4}
        assert await state(handler, "s2") == {}
        client.send(None)  # s1 closes: s2 gets its room
        with pytest.raises(StopAsyncIteration):
            await anext(client.replies)
        assert await asyncio.wait_for(waiting, 2) == "ok"
        assert await state(handler, "s1") == {}
        bad = await handler.rpc_ping(Request(metadata=b'{"session_id": 5}'), context())
        assert kind(bad).startswith("BadRequest")
        for c in (client, big):
            await c.replies.aclose()
        assert (len(sessions), sessions.budget.used) == (0, 0)

    asyncio.run(main())
