from __future__ import annotations

import pytest

from corolla.errors import BadRequest
from corolla.protocol.messages import (
    PROTOCOL_VERSION,
    ErrorInfo,
    ForwardRequest,
    InferenceOpen,
    InferenceStep,
    Message,
    Reply,
    ServerInfoReply,
    ServerInfoRequest,
    StepResult,
    decode,
    encode,
)

MESSAGES: list[Message] = [
    ForwardRequest(start=0, end=30),
    InferenceStep(position=0, open=InferenceOpen(start=3, end=9, max_length=128, batch_size=2)),
    InferenceStep(position=17),
    Reply(result=StepResult(position=5)),
    Reply(error=ErrorInfo(kind="AllocationFailed", message="no room")),
    Reply(),
    ServerInfoRequest(),
    ServerInfoReply(
        version="0.1.0",
        dht_prefix="smollm2-135m-hf",
        start_block=0,
        end_block=15,
        torch_dtype="float32",
        max_batch_size=8192,
        inference_max_length=8192,
        cache_tokens_left=1000,
        active_sessions=2,
        weight_bytes=123456,
    ),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    raw = encode(message)
    assert isinstance(raw, bytes)
    assert decode(type(message), raw) == message


def test_defaults_fill_protocol_and_batch_size() -> None:
    step = decode(InferenceStep, b'{"position": 0, "open": {"start": 1, "end": 2, "max_length": 8}}')
    assert step.open == InferenceOpen(start=1, end=2, max_length=8, batch_size=1, protocol=PROTOCOL_VERSION)
    assert decode(ServerInfoRequest, b"").protocol == PROTOCOL_VERSION


def test_messages_are_frozen() -> None:
    step = InferenceStep(position=1)
    with pytest.raises(ValueError, match="frozen"):
        step.position = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "raw", "field", "reason"),
    [
        (InferenceStep, b"not json", "message", "Invalid JSON"),
        (InferenceStep, b"\xff\xfe", "message", "Invalid JSON"),
        (InferenceStep, b"[1, 2]", "message", "object"),
        (InferenceStep, b"", "position", "Field required"),
        (InferenceStep, b'{"position": -1}', "position", "greater than or equal to 0"),
        (InferenceStep, b'{"position": "soon"}', "position", "valid integer"),
        (InferenceStep, b'{"position": 1.5}', "position", "valid integer"),
        (InferenceStep, b'{"position": 0, "open": {"start": 0}}', "open.end", "Field required"),
        (
            InferenceStep,
            b'{"position": 0, "open": {"start": 0, "end": 2, "max_length": 0}}',
            "open.max_length",
            "greater than 0",
        ),
        (ForwardRequest, b'{"start": -2, "end": 3}', "start", "greater than or equal to 0"),
        (ForwardRequest, b'{"start": 0, "end": 0}', "end", "greater than 0"),
        (ForwardRequest, b'{"start": 0}', "end", "Field required"),
        (Reply, b'{"error": {"kind": "X"}}', "error.message", "Field required"),
    ],
)
def test_malformed_input_raises_one_line_bad_request(
    cls: type[Message], raw: bytes, field: str, reason: str
) -> None:
    with pytest.raises(BadRequest) as info:
        decode(cls, raw)
    message = str(info.value)
    assert message.startswith(f"malformed {cls.__name__}: {field}: ")
    assert reason in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("cls", "raw", "field"),
    [
        (InferenceStep, b'{"position": 1, "tokens": [1, 2]}', "tokens"),
        (ForwardRequest, b'{"start": 0, "end": 2, "hypo": null}', "hypo"),
        (
            InferenceStep,
            b'{"position": 0, "open": {"start": 0, "end": 2, "max_length": 4, "x": 1}}',
            "open.x",
        ),
        (ServerInfoRequest, b'{"protocol": 1, "verbose": true}', "verbose"),
    ],
)
def test_extra_fields_are_forbidden(cls: type[Message], raw: bytes, field: str) -> None:
    with pytest.raises(
        BadRequest, match=rf"^malformed {cls.__name__}: {field}: Extra inputs are not permitted$"
    ):
        decode(cls, raw)


def test_extra_fields_are_forbidden_in_constructors_too() -> None:
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        StepResult(position=1, extra=2)  # type: ignore[call-arg]
