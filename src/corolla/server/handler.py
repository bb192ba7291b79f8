"""RPC handlers: decode a request, check it against the span and the limits, run it, encode the reply.

Every error a peer can cause becomes a typed ``Reply.error`` with a one-line message; the
handler never lets one request disturb another."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from corolla import __version__
from corolla.config import LimitsConfig
from corolla.errors import BadRequest, CorollaError, ServerUnavailable
from corolla.protocol import codec
from corolla.protocol.messages import (
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PING,
    RPC_PUSH,
    BackwardRequest,
    ErrorInfo,
    ForwardRequest,
    InferenceStep,
    PushStep,
    Reply,
    ServerInfoReply,
    ServerInfoRequest,
    SpanRequest,
    StepResult,
    decode,
    encode,
)
from corolla.runtime.backend import SpanBackend
from corolla.server.metrics import ServerMetrics
from corolla.server.sessions import Session, SessionTable

logger = logging.getLogger(__name__)

PUSH_TIMEOUT = 5.0  # seconds a push to the next server may take

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse


def error_response(error: Exception) -> Response:
    if isinstance(error, CorollaError):
        info = ErrorInfo(kind=type(error).__name__, message=str(error))
    else:
        info = ErrorInfo(
            kind="InternalError", message=f"internal server error: {type(error).__name__}: {error}"
        )
    return Response(metadata=encode(Reply(error=info)))


def tensor_response(tensor: torch.Tensor, position: int | None = None) -> Response:
    result = StepResult(position=position) if position is not None else None
    return Response(tensors=[codec.pack(tensor)], metadata=encode(Reply(result=result)))


@dataclass(frozen=True)
class Hosting:
    """The span a server hosts right now: its backend and the sessions opened on it."""

    backend: SpanBackend
    sessions: SessionTable


class Handler:
    """The server's RPCs over the span it hosts (``hosting``, replaced when the server moves)."""

    def __init__(
        self, limits: LimitsConfig, *, dht_prefix: str, hidden_size: int, metrics: ServerMetrics | None = None
    ) -> None:
        self.limits, self.dht_prefix, self.hidden_size = limits, dht_prefix, hidden_size
        # exported only with --metrics_port; without it, counted and never read
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.hosting: Hosting | None = None  # None while loading or moving
        self.pushes_received = 0
        self.stopping = asyncio.Event()

    def current(self) -> Hosting:
        """The hosted span, or ``ServerUnavailable`` while the server stops, loads or moves."""
        if self.stopping.is_set():
            raise ServerUnavailable("the server is shutting down; retry with another server")
        if self.hosting is None:
            raise ServerUnavailable("the server is loading other blocks; retry with another server")
        return self.hosting

    async def register(self, p2p: P2P) -> None:
        self.p2p = p2p
        await p2p.add_protobuf_handler(RPC_PUSH, self.rpc_push, Request)
        await p2p.add_protobuf_handler(RPC_PING, self.rpc_ping, Request)
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, Request)
        await p2p.add_protobuf_handler(
            RPC_FORWARD, self.rpc_forward, Request, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(
            RPC_INFERENCE, self.rpc_inference, Request, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(
            RPC_BACKWARD, self.rpc_backward, Request, stream_input=True, stream_output=True
        )

    async def unregister(self, p2p: P2P) -> None:
        for name in (RPC_PING, RPC_INFO, RPC_PUSH):
            await p2p.remove_protobuf_handler(name)
        for name in (RPC_FORWARD, RPC_INFERENCE, RPC_BACKWARD):
            await p2p.remove_protobuf_handler(name, stream_input=True, stream_output=True)

    # --- RPCs ---------------------------------------------------------------------------------

    async def rpc_ping(self, request: Request, context: P2PContext) -> Response:
        """Echo nothing: peers time how long their payload takes to arrive (bandwidth)."""
        self.metrics.request("ping")
        return Response()

    async def rpc_info(self, request: Request, context: P2PContext) -> Response:
        self.metrics.request("info")
        try:
            decode(ServerInfoRequest, request.metadata)
            hosting = self.current()
        except CorollaError as e:
            self.metrics.error("info", e)
            return error_response(e)
        backend, sessions = hosting.backend, hosting.sessions
        reply = ServerInfoReply(
            version=__version__,
            dht_prefix=self.dht_prefix,
            start_block=backend.start,
            end_block=backend.end,
            torch_dtype=str(backend.dtype).removeprefix("torch."),
            quant_type=backend.quant_type,
            tensor_parallel_devices=[str(d) for d in backend.tp_devices],
            adapters=list(backend.adapters),
            batched_steps=backend.batched_steps,
            max_batch_size=self.limits.max_batch_size,
            inference_max_length=self.limits.inference_max_length,
            cache_tokens_left=sessions.budget.left,
            active_sessions=len(sessions),
            weight_bytes=backend.weight_bytes,
            pushes_received=self.pushes_received,
        )
        return Response(metadata=reply.model_dump_json().encode())

    async def rpc_forward(
        self, requests: AsyncIterator[Request], context: P2PContext
    ) -> AsyncIterator[Response]:
        self.metrics.request("forward")
        try:
            request = await _StepInputs(requests, self.stopping).next(self.limits.request_timeout)
            if request is None:
                raise BadRequest("forward stream closed before its request")
            meta = decode(ForwardRequest, request.metadata)
            hosting = self.current()
            self._check_span(meta, hosting.backend)
            hidden, _, prompts = self._inputs_from(request, meta, grad=False)
            with self.metrics.measure("forward", tokens=hidden.shape[0] * hidden.shape[1]):
                out = await asyncio.wait_for(
                    hosting.backend.run(
                        hidden, meta.start, meta.end, prompts=prompts, adapter=meta.active_adapter
                    ),
                    self.limits.request_timeout,
                )
            yield tensor_response(out)
        except Exception as e:
            yield self._report(e, "forward", context)

    async def rpc_backward(
        self, requests: AsyncIterator[Request], context: P2PContext
    ) -> AsyncIterator[Response]:
        """Gradients of a span's inputs (and deep prompts) from the gradient of its outputs."""
        self.metrics.request("backward")
        try:
            request = await _StepInputs(requests, self.stopping).next(self.limits.request_timeout)
            if request is None:
                raise BadRequest("backward stream closed before its request")
            meta = decode(BackwardRequest, request.metadata)
            hosting = self.current()
            self._check_span(meta, hosting.backend)
            hidden, grad, prompts = self._inputs_from(request, meta, grad=True)
            with self.metrics.measure("backward", tokens=hidden.shape[0] * hidden.shape[1]):
                grad_in, grad_prompts = await asyncio.wait_for(
                    hosting.backend.backward(
                        hidden, grad, meta.start, meta.end, prompts=prompts, adapter=meta.active_adapter
                    ),
                    self.limits.request_timeout,
                )
            tensors = [grad_in] if grad_prompts is None else [grad_in, grad_prompts]
            yield Response(tensors=[codec.pack(t) for t in tensors], metadata=encode(Reply()))
        except Exception as e:
            yield self._report(e, "backward", context)

    async def rpc_inference(
        self, requests: AsyncIterator[Request], context: P2PContext
    ) -> AsyncIterator[Response]:
        self.metrics.request("inference")
        session: Session | None = None
        hosting: Hosting | None = None
        inputs = _StepInputs(requests, self.stopping)
        try:
            request = await inputs.next(self.limits.step_timeout)
            if request is None:
                return
            step = decode(InferenceStep, request.metadata)
            hosting = self.current()
            session = self._open(step, hosting)
            inputs.pushed = session.pushed
            while True:
                if step.step_id == 0 or step.step_id > session.last_step_id or step.open is not None:
                    yield await self._step(session, hosting, request, step)
                # else: a copy of a step already run (pushed by the previous server, then sent by the client)
                remaining = session.deadline - time.monotonic()
                request = await inputs.next(min(self.limits.step_timeout, max(remaining, 0.0)))
                if request is None:
                    return
                if time.monotonic() > session.deadline:
                    raise BadRequest(
                        f"session exceeded the server's --session_timeout "
                        f"({self.limits.session_timeout:.0f} s); open a new session"
                    )
                step = decode(InferenceStep, request.metadata)
        except Exception as e:
            yield self._report(e, "inference", context)
        finally:
            inputs.close()
            if session is not None and hosting is not None:
                hosting.sessions.close(session)

    async def rpc_push(self, request: Request, context: P2PContext) -> Response:
        """The previous server of a chain delivers its output for one of our sessions."""
        self.metrics.request("push")
        try:
            meta = decode(PushStep, request.metadata)
            session = self.current().sessions.find(meta.session_id)
            if session is None:
                raise BadRequest(f"no session {meta.session_id!r} here (closed, or not opened yet)")
            step = InferenceStep(position=meta.position, step_id=meta.step_id)
            session.pushed.put_nowait(Request(metadata=encode(step), tensors=request.tensors))
            self.pushes_received += 1
            return Response()
        except Exception as e:
            self.metrics.error("push", e)
            return error_response(e)

    async def _push(self, session: Session, step: InferenceStep, out: torch.Tensor) -> None:
        """Send ``out`` straight to the next server's session; the client's own copy covers failures."""
        target = session.push_to
        meta = PushStep(session_id=target.session_id, step_id=step.step_id, position=step.position)
        request = Request(metadata=encode(meta), tensors=[codec.pack(out)])
        try:
            peer = PeerID.from_base58(target.peer_id)
            await asyncio.wait_for(
                self.p2p.call_protobuf_handler(peer, RPC_PUSH, request, Response), PUSH_TIMEOUT
            )
        except Exception as e:
            logger.debug("push to ...%s failed: %s", target.peer_id[-8:], e)

    # --- helpers ------------------------------------------------------------------------------

    def _open(self, step: InferenceStep, hosting: Hosting) -> Session:
        if step.open is None:
            raise BadRequest("the first message of an inference stream must carry 'open'")
        meta = step.open
        self._check_span(meta, hosting.backend)
        if meta.max_length > self.limits.inference_max_length:
            raise BadRequest(
                f"max_length {meta.max_length} exceeds this server's --inference_max_length "
                f"{self.limits.inference_max_length}"
            )
        session = hosting.sessions.open(
            start=meta.start,
            end=meta.end,
            max_length=meta.max_length,
            batch_size=meta.batch_size,
            cache=hosting.backend.new_cache(),
            timeout=self.limits.session_timeout,
        )
        hosting.sessions.register_key(session, meta.session_id)
        session.push_to = meta.push_to
        session.adapter = meta.active_adapter
        return session

    async def _step(
        self, session: Session, hosting: Hosting, request: Request, step: InferenceStep
    ) -> Response:
        if self.current() is not hosting:
            raise ServerUnavailable(
                f"this server moved away from blocks {session.start}:{session.end}; retry with another server"
            )
        position = step.position
        hidden, _, prompts = self._inputs_from(request, session, grad=False, prompts=step.prompts)
        session.check_step(position, hidden.shape[0], hidden.shape[1])
        if position < session.length:
            hosting.backend.crop(session.cache, position)
        first = session.last_step_id < 0
        with self.metrics.measure("inference", tokens=hidden.shape[0] * hidden.shape[1]):
            out = await hosting.backend.run(
                hidden, session.start, session.end, session.cache, prompts=prompts, adapter=session.adapter
            )
        session.length = position + hidden.shape[1]
        session.last_step_id = step.step_id
        if session.push_to is not None and not first:  # the next session exists once the chain has run once
            asyncio.create_task(self._push(session, step, out))
        return tensor_response(out, session.length)

    def _check_span(self, meta: SpanRequest, backend: SpanBackend) -> None:
        if meta.protocol != SpanRequest.model_fields["protocol"].default:
            raise BadRequest(
                f"protocol version {meta.protocol} is not supported by this server "
                f"(corolla {__version__}); upgrade the older side"
            )
        if not backend.start <= meta.start < meta.end <= backend.end:
            raise BadRequest(
                f"blocks {meta.start}:{meta.end} are not inside this server's span "
                f"{backend.start}:{backend.end}"
            )

    def _inputs_from(
        self, request: Request, span: Any, *, grad: bool, prompts: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(hidden states, their gradient if ``grad``, deep prompts if announced), checked against
        the span ``span.start..span.end`` and this server's limits."""
        with_prompts = span.prompts if prompts is None else prompts
        names = ["hidden states"] + (["grad_outputs"] if grad else []) + (["prompts"] if with_prompts else [])
        if len(request.tensors) != len(names):
            raise BadRequest(
                f"expected {len(names)} tensors ({', '.join(names)}), got {len(request.tensors)}"
            )
        hidden = self._hidden(codec.unpack(request.tensors[0]), max_tokens=self.limits.max_batch_size)
        grad_out = None
        if grad:
            grad_out = codec.unpack(request.tensors[1])
            if grad_out.shape != hidden.shape or not grad_out.is_floating_point():
                raise BadRequest(
                    "grad_outputs must be floating point with the hidden states' shape "
                    f"{list(hidden.shape)}, got {list(grad_out.shape)} {grad_out.dtype}"
                )
        deep = None
        if with_prompts:
            deep = codec.unpack(request.tensors[-1])
            expected = [span.end - span.start, hidden.shape[0], None, self.hidden_size]
            if (
                deep.ndim != 4
                or not deep.is_floating_point()
                or [deep.shape[0], deep.shape[1], deep.shape[3]] != [expected[0], expected[1], expected[3]]
                or not 0 < deep.shape[2] <= self.limits.max_batch_size
            ):
                raise BadRequest(
                    f"prompts must be floating point [{expected[0]} blocks, {expected[1]} batch, "
                    f"prefix, {self.hidden_size}], got {list(deep.shape)} {deep.dtype}"
                )
        return hidden, grad_out, deep

    def _hidden(self, hidden: torch.Tensor, *, max_tokens: int) -> torch.Tensor:
        if hidden.ndim != 3 or hidden.shape[2] != self.hidden_size or 0 in hidden.shape:
            raise BadRequest(
                f"hidden states must have shape [batch, seq, {self.hidden_size}], got {list(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise BadRequest(f"hidden states must be floating point, got {hidden.dtype}")
        if hidden.shape[0] * hidden.shape[1] > max_tokens:
            raise BadRequest(
                f"request has {hidden.shape[0] * hidden.shape[1]} tokens, more than this "
                f"server's --max_batch_size {max_tokens}; split it"
            )
        return hidden

    def _report(self, error: Exception, rpc: str, context: P2PContext) -> Response:
        self.metrics.error(rpc, error)
        peer = str(context.remote_id)[-8:] if context is not None else "?"
        if isinstance(error, CorollaError):
            logger.info("%s from ...%s refused: %s", rpc, peer, error)
        else:
            logger.exception("%s from ...%s failed", rpc, peer)
        return error_response(error)


class _StepInputs:
    """The next input of an inference session: a client request or a step pushed by the previous
    server, whichever comes first. A pending read of the client's stream survives a push."""

    def __init__(self, requests: AsyncIterator[Request], stopping: asyncio.Event) -> None:
        self.requests, self.stopping = requests, stopping
        self.pushed: asyncio.Queue[Request] | None = None
        self._client: asyncio.Future[Request | None] | None = None

    async def next(self, timeout: float) -> Request | None:
        """``None`` when the client closed the stream; errors on timeout or shutdown."""
        if self._client is None:
            self._client = asyncio.ensure_future(anext(self.requests, None))
        waiters: set[asyncio.Future] = {self._client, asyncio.ensure_future(self.stopping.wait())}
        push = asyncio.ensure_future(self.pushed.get()) if self.pushed is not None else None
        if push is not None:
            waiters.add(push)
        done, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending - {self._client}:
            waiter.cancel()
        if push is not None and push in done:
            return push.result()
        if self._client in done:
            request, self._client = self._client.result(), None
            return request
        if self.stopping.is_set():
            raise ServerUnavailable("the server is shutting down; retry with another server")
        raise ServerUnavailable(
            f"no request within {timeout:.0f} s (--step_timeout/--request_timeout): the stream was closed"
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.cancel()
