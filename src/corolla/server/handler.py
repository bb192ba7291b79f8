"""RPC handlers: decode a request, check it against the span and the limits, run it, encode the reply.

Every error a peer can cause becomes a typed ``Reply.error`` with a one-line message; the
handler never lets one request disturb another."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
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
    StreamProbe,
    StreamState,
    decode,
    encode,
)
from corolla.runtime.backend import SpanBackend
from corolla.server.metrics import ServerMetrics
from corolla.server.sessions import Session, SessionTable
from corolla.swarm.auth import AccessPolicy, sign_request
from corolla.swarm.dht import dial_announced

logger = logging.getLogger(__name__)

PUSH_TIMEOUT = 5.0  # seconds a push to the next server may take
DIAL_AGAIN = 60.0  # seconds before a next server is dialed at its announced addresses again
MESSAGE_SLACK = 2**20  # bytes a stream message may carry beyond its largest possible tensors
WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activations travel in the server's dtype
LINGER = 2.0  # seconds a stream stays open after its last reply, waiting for the caller to hang up

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


def tensor_response(tensor: torch.Tensor, position: int | None = None, dtype: str | None = None) -> Response:
    result = StepResult(position=position) if position is not None else None
    return Response(tensors=[codec.pack(in_dtype(tensor, dtype))], metadata=encode(Reply(result=result)))


def in_dtype(tensor: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """``tensor`` as a client asked to receive it (``reply_dtype``; None: as it is)."""
    return tensor if dtype is None else tensor.to(getattr(torch, dtype))


@dataclass(frozen=True)
class Hosting:
    """The span a server hosts right now: its backend and the sessions opened on it."""

    backend: SpanBackend
    sessions: SessionTable


class Handler:
    """The server's RPCs over the span it hosts (``hosting``, replaced when the server moves)."""

    def __init__(
        self, limits: LimitsConfig, *, dht_prefix: str, hidden_size: int,
        metrics: ServerMetrics | None = None, access: AccessPolicy | None = None,
    ) -> None:  # fmt: skip
        self.limits, self.dht_prefix, self.hidden_size = limits, dht_prefix, hidden_size
        self.access = access or AccessPolicy()  # --swarm_key, --allowed_peers: checked at each RPC's entry
        # exported only with --metrics_port; without it, counted and never read
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.hosting: Hosting | None = None  # None while loading or moving
        self.pushes_received = 0
        self.stopping = asyncio.Event()
        self._pushing: set[asyncio.Task[None]] = set()
        self._push_dialed: dict[str, float] = {}  # next servers dialed at their addresses, and when
        self._opening: dict[str, tuple[str | None, int]] = {}  # sessions waiting for room: (peer, step id)

    def current(self) -> Hosting:
        """The hosted span, or ``ServerUnavailable`` while the server stops, loads or moves."""
        if self.stopping.is_set():
            raise ServerUnavailable("the server is shutting down; retry with another server")
        if self.hosting is None:
            raise ServerUnavailable("the server is loading other blocks; retry with another server")
        return self.hosting

    async def register(self, p2p: P2P) -> None:
        self.p2p = p2p
        limit_stream_messages(self.max_message_bytes)
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

    def max_message_bytes(self) -> int:
        """The largest stream message a peer may send: hidden states, their gradient and deep prompts
        for every hosted block, each at most --max_batch_size tokens of float32, plus metadata."""
        blocks = self.hosting.backend.end - self.hosting.backend.start if self.hosting is not None else 1
        return 4 * self.limits.max_batch_size * self.hidden_size * (2 + blocks) + MESSAGE_SLACK

    async def unregister(self, p2p: P2P) -> None:
        for name in (RPC_PING, RPC_INFO, RPC_PUSH):
            await p2p.remove_protobuf_handler(name)
        for name in (RPC_FORWARD, RPC_INFERENCE, RPC_BACKWARD):
            await p2p.remove_protobuf_handler(name, stream_input=True, stream_output=True)

    # --- RPCs ---------------------------------------------------------------------------------

    async def rpc_ping(self, request: Request, context: P2PContext) -> Response:
        """Echo nothing: peers time how long their payload takes to arrive (bandwidth). A ping
        carrying a ``StreamProbe`` is answered with the state of the caller's inference stream."""
        self.metrics.request("ping")
        try:
            self._authorize(RPC_PING, request, context)
            if not request.metadata:
                return Response()
            probe = decode(StreamProbe, request.metadata)
            return Response(metadata=encode(self._stream_state(probe.session_id, _peer_of(context))))
        except CorollaError as e:
            self.metrics.error("ping", e)
            return error_response(e)

    def _stream_state(self, key: str, peer: str | None) -> StreamState:
        """What this server has of ``peer``'s inference session ``key`` (``StreamProbe``)."""
        if key in self._opening:
            owner, step_id = self._opening[key]
            return StreamState(known=True, received=step_id) if owner == peer else StreamState()
        session = self.hosting.sessions.find(key) if self.hosting is not None else None
        if session is None or session.peer != peer:
            return StreamState()
        return StreamState(known=True, received=session.received_step, done=session.last_step_id)

    async def rpc_info(self, request: Request, context: P2PContext) -> Response:
        self.metrics.request("info")
        try:
            self._authorize(RPC_INFO, request, context)
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
            decode_passes=backend.decode_passes,
            compute_seconds=backend.compute_seconds,
            decode_threads=backend.decode_threads,
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
            request = await self._first_request(requests, "forward")
            self._authorize(RPC_FORWARD, request, context)
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
            yield tensor_response(out, dtype=meta.reply_dtype)
        except Exception as e:
            yield self._report(e, "forward", context)
        await self._linger(context)

    async def rpc_backward(
        self, requests: AsyncIterator[Request], context: P2PContext
    ) -> AsyncIterator[Response]:
        """Gradients of a span's inputs (and deep prompts) from the gradient of its outputs."""
        self.metrics.request("backward")
        try:
            request = await self._first_request(requests, "backward")
            self._authorize(RPC_BACKWARD, request, context)
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
            packed = [codec.pack(in_dtype(t, meta.reply_dtype)) for t in tensors]
            yield Response(tensors=packed, metadata=encode(Reply()))
        except Exception as e:
            yield self._report(e, "backward", context)
        await self._linger(context)

    async def rpc_inference(
        self, requests: AsyncIterator[Request], context: P2PContext
    ) -> AsyncIterator[Response]:
        self.metrics.request("inference")
        session: Session | None = None
        hosting: Hosting | None = None
        inputs = _StepInputs(requests, self.stopping)
        failure: Response | None = None
        ended = "its stream went away"  # why the session ended, for the debug log
        try:
            request = await inputs.next(self.limits.step_timeout)
            if request is None:
                return
            self._authorize(RPC_INFERENCE, request, context)  # the stream's first message: the caller's
            step = decode(InferenceStep, request.metadata)
            hosting = self.current()
            session = await self._open(step, hosting, _peer_of(context))
            session.received_step = step.step_id
            inputs.pushed = session.pushed
            logger.debug("session %d of ...%s opened on blocks %d:%d", session.id, (session.peer or "")[-8:],
                         session.start, session.end)  # fmt: skip
            while True:
                response = await self._run_input(session, hosting, request, step, pushed=inputs.last_was_push)
                if response is not None:
                    yield response
                self._check_deadline(session)
                request = await inputs.next(
                    min(self.limits.step_timeout, session.deadline - time.monotonic())
                )
                if request is None:
                    ended = "the client closed it"
                    return
                self._check_deadline(session)
                step = decode(InferenceStep, request.metadata)
                if step.open is not None:
                    raise BadRequest("only the first message of an inference stream may carry 'open'")
                if not inputs.last_was_push:
                    session.received_step = max(session.received_step, step.step_id)
        except Exception as e:
            failure = self._report(e, "inference", context)
            ended = f"{type(e).__name__}: {e}"
        finally:  # the session's cache is released on every exit, before anything else is awaited
            inputs.close()
            if session is not None and hosting is not None:
                hosting.sessions.close(session)
                logger.debug("session %d ended after step %d: %s", session.id, session.last_step_id, ended)
        if failure is not None:
            yield failure
            await self._linger(context)

    async def rpc_push(self, request: Request, context: P2PContext) -> Response:
        """The previous server of a chain delivers its output for one of our sessions."""
        self.metrics.request("push")
        try:
            self._authorize(RPC_PUSH, request, context)
            meta = decode(PushStep, request.metadata)
            if meta.step_id == 0:
                raise BadRequest("a pushed step needs a step_id above 0")
            session = self.current().sessions.find(meta.session_id)
            if session is None:
                raise BadRequest(f"no session {meta.session_id!r} here (closed, or not opened yet)")
            if len(request.tensors) != 1:
                raise BadRequest(f"a push carries 1 tensor (hidden states), got {len(request.tensors)}")
            hidden = self._hidden(codec.unpack(request.tensors[0]), max_tokens=self.limits.max_batch_size)
            session.check_step(meta.position, hidden.shape[0], hidden.shape[1])
            if meta.step_id <= session.last_step_id:
                self.pushes_received += 1  # delivered, though the client's own copy came first
                return Response()
            if session.last_step_id < 1 or meta.step_id != session.last_step_id + 1:
                raise BadRequest(
                    f"pushed step {meta.step_id} is not the next step of session {meta.session_id!r} "
                    f"(its last step is {session.last_step_id})"
                )
            if session.pushed.full():
                raise BadRequest(
                    f"session {meta.session_id!r} already holds {session.pushed.qsize()} pushed steps"
                )
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
        request = Request(metadata=encode(meta), tensors=[codec.pack(in_dtype(out, session.reply_dtype))])
        try:
            peer = PeerID.from_base58(target.peer_id)
            now = time.monotonic()
            if target.addrs and now - self._push_dialed.get(target.peer_id, -DIAL_AGAIN) >= DIAL_AGAIN:
                self._push_dialed[target.peer_id] = now  # our daemon may not find it on its own
                await dial_announced(self.p2p, peer, target.addrs)
            sign_request(request, self.p2p, peer, RPC_PUSH)
            await asyncio.wait_for(
                self.p2p.call_protobuf_handler(peer, RPC_PUSH, request, Response), PUSH_TIMEOUT
            )
        except Exception as e:
            logger.debug("push to ...%s failed: %s", target.peer_id[-8:], e)

    # --- helpers ------------------------------------------------------------------------------

    def _authorize(self, rpc: str, request: Request, context: P2PContext) -> None:
        """``Unauthorized`` unless the (Noise-authenticated) caller may call ``rpc`` here."""
        if not self.access.open:
            self.access.check(rpc, request.uid, context.remote_id, context.local_id)

    async def _linger(self, context: P2PContext | None) -> None:
        """Keep a stream open after its last reply until the caller hangs up (hivemind then cancels
        this), at most ``LINGER`` s: closing it at once makes the P2P daemons reset the stream, which
        can drop the reply still in flight (a few percent of replies did)."""
        if context is None:  # called directly, not over P2P: no stream to keep
            return
        deadline = time.monotonic() + LINGER
        while not self.stopping.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _first_request(self, requests: AsyncIterator[Request], rpc: str) -> Request:
        """The one request of a forward/backward stream; the read is not left pending on any exit."""
        inputs = _StepInputs(requests, self.stopping)
        try:
            request = await inputs.next(self.limits.request_timeout)
        finally:
            inputs.close()
        if request is None:
            raise BadRequest(f"{rpc} stream closed before its request")
        return request

    async def _open(self, step: InferenceStep, hosting: Hosting, peer: str | None) -> Session:
        """Check the opening step, then reserve the session's cache (waiting up to --max_alloc_timeout
        for room); the caller closes the session on every path from here on."""
        if step.open is None:
            raise BadRequest("the first message of an inference stream must carry 'open'")
        meta = step.open
        self._check_span(meta, hosting.backend)
        if meta.max_length > self.limits.inference_max_length:
            raise BadRequest(
                f"max_length {meta.max_length} exceeds this server's --inference_max_length "
                f"{self.limits.inference_max_length}"
            )
        if meta.batch_size > self.limits.max_batch_size:
            raise BadRequest(
                f"batch_size {meta.batch_size} exceeds this server's --max_batch_size "
                f"{self.limits.max_batch_size}"
            )
        if meta.session_id is not None and hosting.sessions.find(meta.session_id) is not None:
            raise BadRequest(
                f"session_id {meta.session_id!r} is already in use on this server; pick a new one"
            )
        if meta.push_to is not None:
            try:
                PeerID.from_base58(meta.push_to.peer_id)
            except Exception:
                raise BadRequest(f"push_to.peer_id {meta.push_to.peer_id[:64]!r} is not a peer id") from None
        if meta.session_id is not None:
            self._opening[meta.session_id] = (peer, step.step_id)
        try:
            session = await hosting.sessions.open_waiting(
                start=meta.start,
                end=meta.end,
                max_length=meta.max_length,
                batch_size=meta.batch_size,
                cache=hosting.backend.new_cache(meta.max_length),  # allocated on its first step
                timeout=self.limits.session_timeout,
                alloc_timeout=self.limits.max_alloc_timeout,
                peer=peer,
                max_per_peer=self.limits.max_sessions_per_peer,
            )
        finally:
            if meta.session_id is not None:
                self._opening.pop(meta.session_id, None)
        hosting.sessions.register_key(session, meta.session_id)
        session.push_to = meta.push_to
        session.adapter = meta.active_adapter
        session.reply_dtype = meta.reply_dtype
        return session

    async def _run_input(
        self, session: Session, hosting: Hosting, request: Request, step: InferenceStep, *, pushed: bool
    ) -> Response | None:
        """One input of a session: a client's step, or one pushed by the previous server. A step that
        already ran (its pushed copy came first) is skipped; a pushed step that is not the session's
        next one, or does not fit it, is dropped: the client's own copy follows."""
        if not pushed:
            if step.step_id != 0 and step.step_id <= session.last_step_id:
                return None
            return await self._step(session, hosting, request, step)
        if session.last_step_id < 1 or step.step_id != session.last_step_id + 1:
            return None
        try:
            return await self._step(session, hosting, request, step)
        except BadRequest as e:  # raised before anything ran: the session is as it was
            logger.info("dropped a pushed step of session %d: %s", session.id, e)
            return None

    def _check_deadline(self, session: Session) -> None:
        if time.monotonic() >= session.deadline:
            raise BadRequest(
                f"session exceeded the server's --session_timeout "
                f"({self.limits.session_timeout:.0f} s); open a new session"
            )

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
        # the next session exists once the chain has run once; without step ids a push would run twice
        if session.push_to is not None and not first and step.step_id > 0:
            task = asyncio.create_task(self._push(session, step, out))
            self._pushing.add(task)  # referenced until done (the loop keeps only weak references)
            task.add_done_callback(self._pushing.discard)
        return tensor_response(out, session.length, session.reply_dtype)

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
        adapter = getattr(meta, "active_adapter", None)
        if adapter is not None and adapter not in backend.adapters:
            served = ", ".join(repr(name) for name in backend.adapters) or "none"
            raise BadRequest(f"adapter {adapter[:64]!r} is not served here; served adapters: {served}")

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
            if grad_out.shape != hidden.shape or grad_out.dtype not in WIRE_DTYPES:
                raise BadRequest(
                    "grad_outputs must be float32, bfloat16 or float16 with the hidden states' shape "
                    f"{list(hidden.shape)}, got {list(grad_out.shape)} {grad_out.dtype}"
                )
            _check_finite("grad_outputs", grad_out)
        deep = None
        if with_prompts:
            deep = codec.unpack(request.tensors[-1])
            expected = [span.end - span.start, hidden.shape[0], None, self.hidden_size]
            if (
                deep.ndim != 4
                or deep.dtype not in WIRE_DTYPES
                or [deep.shape[0], deep.shape[1], deep.shape[3]] != [expected[0], expected[1], expected[3]]
                or not 0 < deep.shape[1] * deep.shape[2] <= self.limits.max_batch_size
            ):
                raise BadRequest(
                    f"prompts must be float32, bfloat16 or float16 [{expected[0]} blocks, "
                    f"{expected[1]} batch, prefix, {self.hidden_size}] with batch x prefix at most "
                    f"--max_batch_size {self.limits.max_batch_size}, got {list(deep.shape)} {deep.dtype}"
                )
            _check_finite("prompts", deep)
        return hidden, grad_out, deep

    def _hidden(self, hidden: torch.Tensor, *, max_tokens: int) -> torch.Tensor:
        if hidden.ndim != 3 or hidden.shape[2] != self.hidden_size or 0 in hidden.shape:
            raise BadRequest(
                f"hidden states must have shape [batch, seq, {self.hidden_size}], got {list(hidden.shape)}"
            )
        if hidden.dtype not in WIRE_DTYPES:
            raise BadRequest(f"hidden states must be float32, bfloat16 or float16, got {hidden.dtype}")
        if hidden.shape[0] * hidden.shape[1] > max_tokens:
            raise BadRequest(
                f"request has {hidden.shape[0] * hidden.shape[1]} tokens, more than this "
                f"server's --max_batch_size {max_tokens}; split it"
            )
        _check_finite("hidden states", hidden)
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
        self.last_was_push = False  # whether the last input came from the previous server
        self._client: asyncio.Future[Request | None] | None = None
        self._push: asyncio.Future[Request] | None = None

    async def next(self, timeout: float) -> Request | None:
        """``None`` when the client closed the stream; errors on timeout or shutdown. The reads
        stay pending across calls and are cancelled by ``close`` (on every exit of the RPC)."""
        if self._client is None:
            self._client = asyncio.ensure_future(anext(self.requests, None))
        if self._push is None and self.pushed is not None:
            self._push = asyncio.ensure_future(self.pushed.get())
        stop = asyncio.ensure_future(self.stopping.wait())
        waiters = {self._client, stop} | ({self._push} if self._push is not None else set())
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if self._push is not None and self._push.done():
            request, self._push = self._push.result(), None
            self.last_was_push = True
            return request
        if self._client.done():
            request, self._client = self._client.result(), None
            self.last_was_push = False
            return request
        if self.stopping.is_set():
            raise ServerUnavailable("the server is shutting down; retry with another server")
        raise ServerUnavailable(
            f"no request within {timeout:.3g} s (--step_timeout/--request_timeout): the stream was closed"
        )

    def close(self) -> None:
        for reader in (self._client, self._push):
            if reader is not None:
                reader.cancel()
        self._client = self._push = None


def _peer_of(context: P2PContext | None) -> str | None:
    remote = getattr(context, "remote_id", None)
    return remote.to_base58() if remote is not None else None


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not codec.all_finite(tensor):
        raise BadRequest(f"{name} contain NaN or infinite values")


_message_limit: Callable[[], int] | None = None


def limit_stream_messages(max_bytes: Callable[[], int]) -> None:
    """Close a stream whose next message declares more than ``max_bytes()`` bytes, before reading
    it: hivemind would buffer a message of any length its 8-byte header declares. Installed once
    per process (the server's); ``max_bytes`` is read for every message."""
    global _message_limit
    first = _message_limit is None
    _message_limit = max_bytes
    if not first:
        return

    async def receive_raw_data(reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(P2P.HEADER_LEN)
        length = int.from_bytes(header, P2P.BYTEORDER)
        limit = _message_limit() if _message_limit is not None else length
        if length > limit:
            logger.warning(
                "closed a stream whose message declares %d bytes, more than the %d allowed", length, limit
            )
            raise asyncio.IncompleteReadError(b"", length)  # hivemind's "the connection is closed"
        return await reader.readexactly(length)

    P2P.receive_raw_data = staticmethod(receive_raw_data)  # type: ignore[method-assign]
