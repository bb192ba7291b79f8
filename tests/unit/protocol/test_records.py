from __future__ import annotations

import json
from typing import Any

import pytest

from corolla.protocol.records import RECORD_VERSION, ServerInfo, ServerState
from helpers.swarm import record


def make_info(**overrides: Any) -> ServerInfo:
    values: dict[str, Any] = {
        "throughput": 3.5,
        "torch_dtype": "bfloat16",
        "quant_type": "none",
        "tensor_parallel": 1,
        "adapters": [],
        "public_name": "alice's gpu",
        "max_inference_length": 2048,
        "cache_tokens_left": 512,
        "addrs": ["/ip4/192.0.2.2/tcp/31337"],
        **overrides,
    }
    return record(2, 5, **values)


def test_wire_form_is_plain_json_data() -> None:
    wire = make_info().to_wire()
    assert wire == {
        "record_version": RECORD_VERSION,
        "state": int(ServerState.ONLINE),
        "start_block": 2,
        "end_block": 5,
        "throughput": 3.5,
        "torch_dtype": "bfloat16",
        "quant_type": "none",
        "tensor_parallel": 1,
        "adapters": [],
        "public_name": "alice's gpu",
        "version": "0.1.0",
        "max_inference_length": 2048,
        "cache_tokens_left": 512,
        "pinned": False,
        "addrs": ["/ip4/192.0.2.2/tcp/31337"],
    }
    assert json.loads(json.dumps(wire)) == wire


@pytest.mark.parametrize("state", list(ServerState))
def test_round_trip(state: ServerState) -> None:
    info = make_info(state=state, public_name=None)
    parsed = ServerInfo.from_wire(json.loads(json.dumps(info.to_wire())))
    assert parsed == info
    assert parsed is not None and parsed.state is state


def test_unknown_fields_from_newer_peers_are_ignored() -> None:
    wire = {**make_info().to_wire(), "added_in_a_later_release": [1, 2]}
    assert ServerInfo.from_wire(wire) == make_info()


def test_records_of_servers_without_addresses_are_read() -> None:
    wire = make_info().to_wire()
    del wire["addrs"]  # a server of an earlier release
    assert ServerInfo.from_wire(wire) == make_info(addrs=())


def test_records_are_frozen() -> None:
    info = make_info()
    with pytest.raises(ValueError, match="frozen"):
        info.start_block = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    "value",
    [None, 42, "ONLINE", [2, 0, 3], (2, 0, 3), b"{}", {}],
    ids=["none", "int", "str", "list", "legacy-tuple", "bytes", "empty-dict"],
)
def test_non_records_are_none(value: object) -> None:
    assert ServerInfo.from_wire(value) is None


@pytest.mark.parametrize("version", [0, RECORD_VERSION + 1, "1", None])
def test_other_record_versions_are_none(version: object) -> None:
    assert ServerInfo.from_wire({**make_info().to_wire(), "record_version": version}) is None


def test_missing_record_version_is_none() -> None:
    wire = make_info().to_wire()
    del wire["record_version"]
    assert ServerInfo.from_wire(wire) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("state", 7),
        ("state", "sleeping"),
        ("start_block", -1),
        ("end_block", 0),
        ("throughput", -0.5),
        ("throughput", float("nan")),
        ("throughput", "fast"),
        ("max_inference_length", -1),
        ("cache_tokens_left", -3),
        ("torch_dtype", None),
        ("version", 1.5),
        ("addrs", "/ip4/192.0.2.2/tcp/31337"),
        ("addrs", [""]),
        ("addrs", ["/ip4/192.0.2.2/tcp/1" + "1" * 256]),
        ("addrs", [f"/ip4/192.0.2.2/tcp/{port}" for port in range(17)]),
    ],
)
def test_malformed_fields_are_none(field: str, value: object) -> None:
    assert ServerInfo.from_wire({**make_info().to_wire(), field: value}) is None


@pytest.mark.parametrize("field", ["state", "start_block", "end_block", "throughput", "version"])
def test_missing_required_field_is_none(field: str) -> None:
    wire = make_info().to_wire()
    del wire[field]
    assert ServerInfo.from_wire(wire) is None


@pytest.mark.parametrize(("start", "end"), [(3, 3), (5, 2)])
def test_empty_or_reversed_span_is_none(start: int, end: int) -> None:
    assert ServerInfo.from_wire({**make_info().to_wire(), "start_block": start, "end_block": end}) is None


def test_single_block_span_is_valid() -> None:
    info = ServerInfo.from_wire({**make_info().to_wire(), "start_block": 4, "end_block": 5})
    assert info is not None and (info.start_block, info.end_block) == (4, 5)
