"""Talking to servers: a background event loop for hivemind P2P, and typed RPC calls.

The client API is synchronous (``generate`` calls forward step by step); every network call
runs as a coroutine on one background loop and the caller waits with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from pydantic import ValidationError

from corolla import errors
from corolla.errors import RemoteError, ServerUnavailable
from corolla.protocol import codec
from corolla.protocol.messages import (
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PING,
    BackwardRequest,
    ForwardRequest,
    InferenceOpen,
    InferenceStep,
    Message,
    PushTarget,
    Reply,
    ServerInfoReply,
    ServerInfoRequest,
    StreamProbe,
    StreamState,
    decode,
    encode,
)
from corolla.swarm.auth import sign_request

T = TypeVar("T")

# errors after which a client routes around the server (the server, not the request, is at fault)
RETRIABLE: tuple[type[Exception], ...] = (ServerUnavailable, RemoteError)
LIVENESS_PERIOD = 1.0  # seconds a step may take before the client checks that the server is alive
# A step whose server is alive but holds neither its input nor a reply for it this long after it was
# sent (plus its bytes at LOST_LINK_RATE) was lost with its stream: the connection under it went away
# while the server's other connections stayed (a relay reset it or restarted; hivemind's stream
# reader does not see it end). Checked twice, LOST_CONFIRM apart.
LOST_AFTER = 1.5
LOST_CONFIRM = 1.0
LOST_LINK_RATE = 1.25e6  # bytes/s (10 Mbit/s): a slow uplink still delivers a large step in time
STREAM_LOST = "its stream was lost"  # in the error's text: the server is retried (manager.failed)


class EventLoopThread:
    """One daemon thread running an asyncio loop; ``run`` submits a coroutine and waits."""

    _instance: EventLoopThread | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="corolla-client-loop", daemon=True)
        self._thread.start()

    @classmethod
    def get(cls) -> EventLoopThread:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise ServerUnavailable(f"no answer within {timeout:.0f} s") from None


def _request(meta: Message, *tensors: torch.Tensor | None) -> runtime_pb2.ExpertRequest:
    packed = [codec.pack(t) for t in tensors if t is not None]
    return runtime_pb2.ExpertRequest(metadata=encode(meta), tensors=packed)


def _result(response: runtime_pb2.ExpertResponse, peer: str) -> tuple[torch.Tensor, Reply]:
    """The tensor of a reply, or the server's typed error raised here."""
    tensors, reply = _results(response, peer, 1)
    return tensors[0], reply


def _results(response: runtime_pb2.ExpertResponse, peer: str, count: int) -> tuple[list[torch.Tensor], Reply]:
    """The ``count`` tensors of a reply, or the server's typed error raised here."""
    reply = Reply.model_validate_json(response.metadata or b"{}")
    if reply.error is not None:
        cls = getattr(errors, reply.error.kind, None)
        if (
            not (isinstance(cls, type) and issubclass(cls, errors.CorollaError))
            or cls is errors.MissingBlocks
        ):
            cls = RemoteError
        raise cls(f"server ...{peer[-8:]}: {reply.error.message}")
    if len(response.tensors) != count:
        raise RemoteError(f"server ...{peer[-8:]} sent {len(response.tensors)} tensors instead of {count}")
    return [codec.unpack(t) for t in response.tensors], reply


async def call_forward(
    p2p: P2P,
    peer_id: PeerID,
    start: int,
    end: int,
    hidden: torch.Tensor,
    *,
    prompts: torch.Tensor | None = None,
    adapter: str | None = None,
    reply_dtype: str | None = None,
) -> torch.Tensor:
    """Run blocks ``start..end-1`` of one server on a whole sequence, without a cache."""
    meta = ForwardRequest(
        start=start, end=end, prompts=prompts is not None, active_adapter=adapter,
        reply_dtype=reply_dtype,  # type: ignore[arg-type]  (checked by ClientConfig)
    )  # fmt: skip
    return (await _call_span(p2p, peer_id, RPC_FORWARD, _request(meta, hidden, prompts), 1))[0]


async def call_backward(
    p2p: P2P,
    peer_id: PeerID,
    start: int,
    end: int,
    hidden: torch.Tensor,
    grad_outputs: torch.Tensor,
    *,
    prompts: torch.Tensor | None = None,
    adapter: str | None = None,
    reply_dtype: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of blocks ``start..end-1``'s inputs (and deep prompts) on one server."""
    meta = BackwardRequest(
        start=start, end=end, prompts=prompts is not None, active_adapter=adapter,
        reply_dtype=reply_dtype,  # type: ignore[arg-type]
    )  # fmt: skip
    request = _request(meta, hidden, grad_outputs, prompts)
    grads = await _call_span(p2p, peer_id, RPC_BACKWARD, request, 1 if prompts is None else 2)
    return grads[0], (grads[1] if prompts is not None else None)


async def _call_span(
    p2p: P2P, peer_id: PeerID, rpc: str, request: runtime_pb2.ExpertRequest, count: int
) -> list[torch.Tensor]:
    async def one_request() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        yield request

    sign_request(request, p2p, peer_id, rpc)  # in a closed swarm: prove the swarm key
    try:
        responses = await p2p.iterate_protobuf_handler(
            peer_id, rpc, one_request(), runtime_pb2.ExpertResponse
        )
        async for response in responses:
            return _results(response, peer_id.to_base58(), count)[0]
    except errors.CorollaError:
        raise
    except Exception as e:
        raise ServerUnavailable(
            f"server ...{peer_id.to_base58()[-8:]} failed: {type(e).__name__}: {e}"
        ) from e
    raise ServerUnavailable(f"server ...{peer_id.to_base58()[-8:]} closed the stream without a reply")


async def call_info(p2p: P2P, peer_id: PeerID) -> ServerInfoReply:
    """A server's live status (span, limits, free cache, weight bytes)."""
    request = runtime_pb2.ExpertRequest(metadata=encode(ServerInfoRequest()))
    sign_request(request, p2p, peer_id, RPC_INFO)
    try:
        response = await p2p.call_protobuf_handler(peer_id, RPC_INFO, request, runtime_pb2.ExpertResponse)
    except Exception as e:
        raise ServerUnavailable(
            f"server ...{peer_id.to_base58()[-8:]} failed: {type(e).__name__}: {e}"
        ) from e
    try:
        return ServerInfoReply.model_validate_json(response.metadata)
    except ValidationError:
        _results(response, peer_id.to_base58(), 0)  # a refusal (Unauthorized, ...): raised typed here
        raise


def _lost(state: StreamState | None, step_id: int) -> str | None:
    """Why a step whose reply has not come was lost on its way, going by what the server says of
    its stream; ``None`` while it may still come (the server runs it, or does not say)."""
    if state is None:
        return None
    if not state.known:
        return "does not hold the session"
    if state.done >= step_id:
        return "ran the step and its reply did not come"
    if state.received < step_id:
        return "never got the step"
    return None  # received and not yet run: queued or computing


def _reply_bytes(hidden: torch.Tensor) -> int:
    """About what a step's reply weighs: its hidden states in float32 at most."""
    return hidden.numel() * 4


async def probe_stream(p2p: P2P, peer_id: PeerID, session_id: str, timeout: float) -> StreamState | None:
    """A ping asking what the server has of our inference session ``session_id``. ``None``: the
    server is alive but does not say (an older one); ``ServerUnavailable``: it did not answer."""
    request = _request(StreamProbe(session_id=session_id))
    sign_request(request, p2p, peer_id, RPC_PING)
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(peer_id, RPC_PING, request, runtime_pb2.ExpertResponse), timeout
        )
    except Exception as e:
        raise ServerUnavailable(f"server ...{peer_id.to_base58()[-8:]} did not answer a ping") from e
    try:
        return decode(StreamState, response.metadata) if response.metadata else None
    except Exception:  # an error reply (a refused ping): the server says nothing of the stream
        return None


async def measure_rtt(p2p: P2P, peer_id: PeerID, *, pings: int = 2, timeout: float = 2.0) -> float:
    """The best of a few ``ping`` round trips to a server, in seconds (``inf`` if it does not answer)."""
    best = float("inf")
    request = sign_request(runtime_pb2.ExpertRequest(), p2p, peer_id, RPC_PING)
    for _ in range(pings):
        started = time.perf_counter()
        try:
            await asyncio.wait_for(
                p2p.call_protobuf_handler(peer_id, RPC_PING, request, runtime_pb2.ExpertResponse),
                timeout,
            )
        except Exception:
            return best
        best = min(best, time.perf_counter() - started)
    return best


class InferenceStream:
    """One open inference stream to one server: ``step`` sends hidden states, returns its output."""

    def __init__(
        self, p2p: P2P, peer_id: PeerID, start: int, end: int, max_length: int, batch_size: int,
        *, push_to: PushTarget | None = None, adapter: str | None = None, reply_dtype: str | None = None,
    ) -> None:  # fmt: skip
        self.p2p, self.peer_id = p2p, peer_id
        self.session_id = uuid.uuid4().hex
        self.open_meta = InferenceOpen(
            start=start, end=end, max_length=max_length, batch_size=batch_size,
            session_id=self.session_id, push_to=push_to, active_adapter=adapter,
            reply_dtype=reply_dtype,  # type: ignore[arg-type]
        )  # fmt: skip
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._responses: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self.position = 0

    @property
    def peer(self) -> str:
        return self.peer_id.to_base58()

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (item := await self._outbox.get()) is not None:
            yield item

    async def step(
        self,
        hidden: torch.Tensor,
        position: int,
        timeout: float,
        step_id: int = 0,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        first = self._responses is None
        opening = self.open_meta if first else None
        meta = InferenceStep(position=position, step_id=step_id, open=opening, prompts=prompts is not None)
        try:
            if self._responses is None:
                self._responses = await self.p2p.iterate_protobuf_handler(
                    self.peer_id, RPC_INFERENCE, self._requests(), runtime_pb2.ExpertResponse
                )
            request = _request(meta, hidden, prompts)
            if first:  # the stream's first message carries the proof (closed swarms)
                sign_request(request, self.p2p, self.peer_id, RPC_INFERENCE)
            self._outbox.put_nowait(request)
            response = await self._receive(timeout, step_id, request.ByteSize() + _reply_bytes(hidden))
        except StopAsyncIteration:
            raise ServerUnavailable(f"server ...{self.peer[-8:]} closed the session") from None
        except TimeoutError:
            await self.close()
            raise ServerUnavailable(
                f"server ...{self.peer[-8:]} did not answer a step within {timeout:.0f} s"
            ) from None
        except errors.CorollaError:
            raise
        except Exception as e:
            raise ServerUnavailable(f"server ...{self.peer[-8:]} failed: {type(e).__name__}: {e}") from e
        out, _ = _result(response, self.peer)
        self.position = position + hidden.shape[1]
        return out

    async def _receive(self, timeout: float, step_id: int, nbytes: int) -> runtime_pb2.ExpertResponse:
        """The response to step ``step_id`` (``nbytes`` to carry both ways). While it takes longer
        than ``LIVENESS_PERIOD``, ask the server about the stream each second: a killed server is
        noticed within seconds, not when ``timeout`` runs out (hivemind's stream reader does not end
        while our side of the stream is idle), and so is a step lost with its stream (``_lost``)."""
        assert self._responses is not None
        receive = asyncio.ensure_future(anext(self._responses))
        sent = time.monotonic()
        deadline, patience = sent + timeout, LOST_AFTER + nbytes / LOST_LINK_RATE
        lost_since: float | None = None
        try:
            while True:
                done, _ = await asyncio.wait(
                    {receive}, timeout=min(LIVENESS_PERIOD, max(0.0, deadline - time.monotonic()))
                )
                if done:
                    return receive.result()
                if time.monotonic() >= deadline:
                    raise TimeoutError
                try:
                    state = await probe_stream(self.p2p, self.peer_id, self.session_id, 2 * LIVENESS_PERIOD)
                except ServerUnavailable:
                    raise ServerUnavailable(
                        f"server ...{self.peer[-8:]} stopped answering (its connection is gone)"
                    ) from None
                now = time.monotonic()
                why = _lost(state, step_id) if now - sent >= patience else None
                if why is None or receive.done():
                    lost_since = None
                elif lost_since is None:
                    lost_since = now
                elif now - lost_since >= LOST_CONFIRM:
                    raise ServerUnavailable(
                        f"server ...{self.peer[-8:]} answers pings but {why} {now - sent:.1f} s after it "
                        f"was sent: {STREAM_LOST}"
                    )
        finally:
            if not receive.done():
                receive.cancel()

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._responses is not None:
            responses, self._responses = self._responses, None
            with contextlib.suppress(Exception):  # the stream is gone either way
                await asyncio.wait_for(responses.aclose(), timeout=1.0)  # type: ignore[attr-defined]
