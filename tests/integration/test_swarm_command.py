"""``corolla swarm`` against a real swarm: a DHT peer and two servers of a tiny model on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from corolla.lab.local_swarm import LOOPBACK, LocalServer, stop_all

PREFIX = "swarmview"
T = TypeVar("T")
SPANS = {"alice": (0, 3), "bob": (1, 4)}  # of the tiny model's 6 blocks: 4-5 stay uncovered
THROUGHPUT = {"alice": 12.5, "bob": 1234.0}


@pytest.fixture(scope="module")
def servers(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, LocalServer]]:
    log_dir = tmp_path_factory.mktemp("swarmview")
    started: dict[str, LocalServer] = {}
    try:
        for name, (start, end) in SPANS.items():
            args = [str(tiny_gqa_dir), "--block_indices", f"{start}:{end}", "--host_maddrs", LOOPBACK]
            args += ["--initial_peers", dht_peer.maddr or "", "--dht_prefix", PREFIX, "--public_name", name]
            args += ["--throughput", str(THROUGHPUT[name])]  # announced as is: no benchmark at start-up
            started[name] = LocalServer(args, log_dir=log_dir, name=name)
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        stop_all(list(started.values()))


def corolla_swarm(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "corolla.cli.main", "swarm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def swarm_json(model: str, peer: str) -> dict[str, Any]:
    result = corolla_swarm(model, "--initial_peers", peer, "--dht_prefix", PREFIX, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(probe: Callable[[], T], ok: Callable[[T], bool]) -> T:
    """Run ``probe`` until ``ok`` holds (records travel through the DHT), at most ~30 s."""
    deadline = time.monotonic() + 30
    seen = probe()
    while not ok(seen) and time.monotonic() < deadline:
        time.sleep(1)
        seen = probe()
    return seen


def peer_id(server: LocalServer) -> str:
    return (server.maddr or "").rsplit("/p2p/", 1)[-1]


def rows(view: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    return [(s["public_name"], s["start"], s["end"], s["state"]) for s in view["servers"]]


BOTH_ONLINE = [("alice", 0, 3, "ONLINE"), ("bob", 1, 4, "ONLINE")]


def test_table_shows_servers_spans_and_uncovered_blocks(
    servers: dict[str, LocalServer], dht_peer: LocalServer, tiny_gqa_dir: Path
) -> None:
    args = [str(tiny_gqa_dir), "--initial_peers", dht_peer.maddr or "", "--dht_prefix", PREFIX]
    result = wait_for(lambda: corolla_swarm(*args), lambda r: "2 servers (2 online)" in r.stdout)
    assert result.returncode == 0, result.stderr  # uncovered blocks are information, not an error
    lines = result.stdout.splitlines()
    assert lines[0] == f"swarm '{PREFIX}' (6 blocks): 2 servers (2 online)"
    table = [line.split() for line in lines if line.startswith("...")]
    assert [(row[1], row[2], row[4], row[5]) for row in table] == [
        ("alice", "0:3", "ONLINE", "12.5"),
        ("bob", "1:4", "ONLINE", "1,234.0"),
    ]
    assert [row[0] for row in table] == ["..." + peer_id(servers[n])[-8:] for n in ("alice", "bob")]
    assert "servers  1221.." in lines
    assert lines[-1] == "uncovered blocks: 4-5 (2 of 6)"


def test_json_gives_the_same_with_full_peer_ids(
    servers: dict[str, LocalServer], dht_peer: LocalServer, tiny_gqa_dir: Path
) -> None:
    view = wait_for(
        lambda: swarm_json(str(tiny_gqa_dir), dht_peer.maddr or ""), lambda v: rows(v) == BOTH_ONLINE
    )
    assert rows(view) == BOTH_ONLINE
    assert [s["peer_id"] for s in view["servers"]] == [peer_id(servers[n]) for n in ("alice", "bob")]
    assert view["num_blocks"] == 6 and view["dht_prefix"] == PREFIX
    assert view["block_counts"] == [1, 2, 2, 1, 0, 0]
    assert view["uncovered_blocks"] == [4, 5]
    assert [s["throughput"] for s in view["servers"]] == [THROUGHPUT["alice"], THROUGHPUT["bob"]]
    assert all(s["version"] for s in view["servers"])


def test_a_model_absent_here_needs_only_prefix_and_block_count(
    servers: dict[str, LocalServer], dht_peer: LocalServer
) -> None:
    args = ["/no/such/model", "--initial_peers", dht_peer.maddr or "", "--dht_prefix", PREFIX]
    result = corolla_swarm(*args, "--num_blocks", "6", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["block_counts"] == [1, 2, 2, 1, 0, 0]
    missing = corolla_swarm(*args)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "--num_blocks" in missing.stderr


@pytest.mark.parametrize(
    "peer",
    [
        "not-a-multiaddr",
        "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDyQ8cM8jaPLqNDHYxwmrB6fD13Hnp52TW4DCxSW74gkA",  # nobody listens
    ],
)
def test_bad_peers_are_one_line_errors(peer: str) -> None:
    result = corolla_swarm("--initial_peers", peer, "--dht_prefix", PREFIX, "--num_blocks", "6")
    assert result.returncode == 2
    assert result.stderr.startswith("corolla swarm: error: ") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_a_server_stopped_with_sigterm_leaves_the_table(
    servers: dict[str, LocalServer], dht_peer: LocalServer, tiny_gqa_dir: Path
) -> None:
    """Runs last in this module: it stops bob."""
    servers["bob"].terminate()
    servers["bob"].process.wait(timeout=15)
    view = wait_for(
        lambda: swarm_json(str(tiny_gqa_dir), dht_peer.maddr or ""),
        lambda v: ("bob", 1, 4, "ONLINE") not in rows(v),
    )
    assert rows(view) in (
        [("alice", 0, 3, "ONLINE")],
        [("alice", 0, 3, "ONLINE"), ("bob", 1, 4, "OFFLINE")],
    )
    assert view["block_counts"] == [1, 1, 1, 0, 0, 0]
    assert view["uncovered_blocks"] == [3, 4, 5]
