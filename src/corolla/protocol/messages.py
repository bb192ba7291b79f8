"""Typed RPC metadata. Tensors travel in hivemind's ``ExpertRequest``/``ExpertResponse``
protobufs; everything else is one of these models, JSON-encoded into ``metadata``. In a closed
swarm a request's ``uid`` field carries the caller's proof of the swarm key (``corolla.swarm.auth``)."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corolla.errors import BadRequest

PROTOCOL_VERSION = 1

RPC_INFO = "corolla.info"
RPC_FORWARD = "corolla.forward"
RPC_INFERENCE = "corolla.inference"
RPC_PING = "corolla.ping"
RPC_PUSH = "corolla.push"
RPC_BACKWARD = "corolla.backward"


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class SpanRequest(Message):
    """Which blocks to run, as absolute block indices ``[start, end)``."""

    protocol: int = PROTOCOL_VERSION
    start: int = Field(ge=0)
    end: int = Field(gt=0)


AdapterName = Field(default=None, min_length=1, max_length=256)
# the dtype a client asks the server to send its outputs in (None: the server's own); a smaller one
# halves the bytes on a slow uplink, at the cost of rounding the activations
WireDtype = Literal["float32", "bfloat16", "float16"]


class ForwardRequest(SpanRequest):
    """A whole sequence through the span, no cache. Tensors: ``[hidden_states]``, then with
    ``prompts`` the deep prompts ``[end - start, batch, prefix, hidden]`` (added to the first
    ``prefix`` positions before each block). ``active_adapter`` names a LoRA adapter the server
    announced (None: the base weights)."""

    prompts: bool = False
    active_adapter: str | None = AdapterName
    reply_dtype: WireDtype | None = None


class BackwardRequest(ForwardRequest):
    """The gradient of a span's inputs. Tensors: ``[hidden_states, grad_outputs]``, then with
    ``prompts`` the deep prompts. The reply's tensors: ``[grad_inputs]``, then ``[grad_prompts]``."""


class PushTarget(Message):
    """The next server of the chain and the id of the client's session there; ``addrs``: where its
    record says it can be dialed (a server behind NAT: through relays), tried before pushing."""

    peer_id: str = Field(min_length=1, max_length=128)
    session_id: str = Field(min_length=1, max_length=64)
    addrs: tuple[Annotated[str, Field(max_length=512)], ...] = Field(default=(), max_length=16)


class InferenceOpen(SpanRequest):
    """First message of an inference stream: reserves a KV cache of ``max_length`` tokens.

    ``session_id`` lets the previous server of the chain push its outputs into this session;
    ``push_to`` asks this server to push its own outputs to the next one (server-to-server push);
    ``reply_dtype``: the dtype of those outputs (None: the server's)."""

    max_length: int = Field(gt=0)
    batch_size: int = Field(default=1, gt=0)
    session_id: str | None = Field(default=None, min_length=1, max_length=64)
    push_to: PushTarget | None = None
    active_adapter: str | None = AdapterName
    reply_dtype: WireDtype | None = None  # for its outputs, and its pushes to the next server


class InferenceStep(Message):
    """One step. Tensors: ``[hidden_states]`` for positions ``position .. position+len-1``.

    ``position`` below the session's length rolls the cache back to it (a replay)."""

    position: int = Field(ge=0)
    step_id: int = Field(default=0, ge=0)  # the client's step counter (0: none): a step seen twice runs once
    open: InferenceOpen | None = None
    prompts: bool = False  # a second tensor: deep prompts, as in ForwardRequest


class PushStep(Message):
    """A server's output for the next server's session. Tensors: ``[hidden_states]``."""

    session_id: str = Field(min_length=1, max_length=64)
    step_id: int = Field(ge=0)
    position: int = Field(ge=0)


class StreamProbe(Message):
    """A ping that also asks about the caller's inference stream (``session_id`` of its
    ``InferenceOpen``): a client whose step goes unanswered learns whether the server has it."""

    session_id: str = Field(min_length=1, max_length=64)


class StreamState(Message):
    """A ping's answer to a ``StreamProbe``. ``known``: the server has the session (open, or still
    waiting for cache room); ``received``: the last step id it read from the client's stream;
    ``done``: the last step id it ran (from the client or pushed); -1: none yet."""

    known: bool = False
    received: int = -1
    done: int = -1


class StepResult(Message):
    position: int


class ErrorInfo(Message):
    """An error the server reports instead of a result; ``kind`` names a corolla.errors class."""

    kind: str
    message: str


class Reply(Message):
    """Metadata of every response: a result or an error."""

    result: StepResult | None = None
    error: ErrorInfo | None = None


class ServerInfoRequest(Message):
    protocol: int = PROTOCOL_VERSION


class ServerInfoReply(Message):
    version: str
    dht_prefix: str
    start_block: int
    end_block: int
    torch_dtype: str
    quant_type: str = "none"
    tensor_parallel_devices: list[str] = []
    adapters: list[str] = []
    batched_steps: int = 0  # decode steps that ran merged with other sessions' steps
    decode_passes: int = 0  # passes over the weights for decode steps (merged or alone)
    compute_seconds: float = 0.0  # time the compute thread spent computing, since start
    decode_threads: int | None = None  # CPU threads decode passes compute with now (None: not on CPU)
    max_batch_size: int
    inference_max_length: int
    cache_tokens_left: int
    active_sessions: int
    weight_bytes: int
    pushes_received: int = 0


M = TypeVar("M", bound=Message)


def encode(message: Message) -> bytes:
    """JSON without the fields left at their defaults: a peer that predates an optional field still
    reads the messages that do not use it."""
    return message.model_dump_json(exclude_defaults=True).encode()


def decode(cls: type[M], raw: bytes) -> M:
    """Parse metadata from a peer; malformed input raises ``BadRequest`` with what was wrong."""
    try:
        return cls.model_validate_json(raw or b"{}")
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise BadRequest(f"malformed {cls.__name__}: {where}: {first['msg']}") from None
