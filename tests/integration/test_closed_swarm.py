"""A closed swarm of real processes: a DHT peer and two servers with ``--swarm_key`` (the second one
also with ``--allowed_peers``), and an intruder server without the key, all on one DHT."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from hivemind import DHT
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from corolla import AutoDistributedModelForCausalLM
from corolla.client.transport import call_forward, call_info
from corolla.config import ClientConfig, NetworkConfig
from corolla.errors import MissingBlocks, Unauthorized
from corolla.lab.local_swarm import LOOPBACK, LocalServer, server_args, stop_all
from corolla.protocol.uids import make_uids
from corolla.swarm.auth import SwarmKeyValidator, load_swarm_key, write_swarm_key
from corolla.swarm.dht import start_dht
from corolla.swarm.identity import ServerIdentity
from corolla.swarm.registry import announce, fetch_block_records
from helpers.swarm import record

PREFIX = "closed"
T = TypeVar("T")


@dataclass(frozen=True)
class Keys:
    swarm: str
    wrong: str
    listed: str  # identity file of the client that --allowed_peers lists
    listed_id: str
    allowed: str


@dataclass(frozen=True)
class Swarm:
    peer: str  # the keyed DHT peer's multiaddr
    servers: dict[str, LocalServer]

    def peer_id(self, name: str) -> str:
        return (self.servers[name].maddr or "").rsplit("/p2p/", 1)[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    write_swarm_key(d / "swarm.key")
    write_swarm_key(d / "wrong.key")
    listed_id = ServerIdentity.load_or_create(str(d / "listed.id")).peer_id
    (d / "allowed.txt").write_text(f"# clients the second server answers\n\n{listed_id}  # the listed one\n")
    return Keys(
        str(d / "swarm.key"), str(d / "wrong.key"), str(d / "listed.id"), listed_id, str(d / "allowed.txt")
    )


@pytest.fixture(scope="module")
def swarm(tiny_gqa_dir: Path, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    log_dir = tmp_path_factory.mktemp("closed")
    started: dict[str, LocalServer] = {}
    try:
        dht = LocalServer(
            ["--host_maddrs", LOOPBACK, "--swarm_key", keys.swarm],
            log_dir=log_dir, name="dht", module="corolla.cli.run_dht",
        )  # fmt: skip
        started["dht"] = dht
        peer = dht.wait_ready()
        key = ["--swarm_key", keys.swarm]
        layout = {
            "first": ((0, 3), [*key]),
            "second": ((3, 6), [*key, "--allowed_peers", keys.allowed]),
            "intruder": ((0, 3), []),  # no key: tries to join the closed swarm
        }
        for name, (span, extra) in layout.items():
            args = server_args(str(tiny_gqa_dir), span, LOOPBACK, [peer], extra)
            args += ["--dht_prefix", PREFIX, "--public_name", name, "--throughput", "100"]
            started[name] = LocalServer(args, log_dir=log_dir, name=name)
        for server in started.values():
            server.wait_ready()
        yield Swarm(peer, {k: v for k, v in started.items() if k != "dht"})
    finally:
        stop_all(list(started.values()))


def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    seen = probe()
    while not ok(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = probe()
    return seen


def names_seen(dht: DHT) -> dict[str, str]:
    """peer id -> public name of every record a DHT peer accepts under the test prefix."""
    records = fetch_block_records(dht, PREFIX, 6)
    return {peer: info.public_name or "" for block in records for peer, info in block.items()}


def client(model_dir: Path, swarm: Swarm, **kwargs: Any):  # type: ignore[no-untyped-def]
    config = ClientConfig(max_wait_for_blocks=1.0, update_period=1.0)
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(model_dir), initial_peers=[swarm.peer], dht_prefix=PREFIX, client_config=config, **kwargs
    )


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(seed))


def test_keyed_listed_client_generates_like_local_transformers(
    swarm: Swarm,
    keys: Keys,
    tiny_gqa_dir: Path,
    local_model,  # type: ignore[no-untyped-def]
) -> None:
    model = client(tiny_gqa_dir, swarm, swarm_key=keys.swarm, identity_path=keys.listed)
    try:
        manager = model.manager
        assert manager.p2p.peer_id.to_base58() == keys.listed_id
        # the intruder's record (same blocks as "first") is not in the keyed view
        spans = wait_for(manager.spans, lambda s: len(s) == 2, timeout=10)
        assert {s.peer_id: (s.start, s.end) for s in spans} == {
            swarm.peer_id("first"): (0, 3),
            swarm.peer_id("second"): (3, 6),
        }
        ids = prompt(1)
        with torch.no_grad():
            expected = local_model.generate(ids, max_new_tokens=12, do_sample=False)
            got = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, expected)
        # "first" is not in --allowed_peers, yet its pushes reach "second": pushes are exempt (how
        # many arrive before the client's own copy depends on timing; a refused push counts none)
        second = PeerID.from_base58(swarm.peer_id("second"))
        assert manager.loop.run(call_info(manager.p2p, second), timeout=30).pushes_received > 0
    finally:
        model.manager.shutdown()


def test_intruder_without_the_key_cannot_announce(swarm: Swarm, keys: Keys) -> None:
    keyed = start_dht(NetworkConfig(initial_peers=(swarm.peer,), swarm_key=keys.swarm), client_mode=True)
    open_ = start_dht(NetworkConfig(initial_peers=(swarm.peer,)), client_mode=True)
    try:
        seen = wait_for(lambda: names_seen(keyed), lambda s: len(s) == 2)
        assert sorted(seen.values()) == ["first", "second"]
        # an open peer reads only the intruder's record; the closed swarm's are not its to read
        assert names_seen(open_) == {swarm.peer_id("intruder"): "intruder"}
    finally:
        keyed.shutdown()
        open_.shutdown()
    assert "did not accept the record" in swarm.servers["intruder"].log_path.read_text()


@pytest.mark.parametrize("key", ["none", "wrong"])
def test_client_without_the_key_sees_no_servers_and_is_refused(
    swarm: Swarm, keys: Keys, tiny_gqa_dir: Path, key: str
) -> None:
    model = client(tiny_gqa_dir, swarm, swarm_key=keys.wrong if key == "wrong" else None)
    manager = model.manager
    try:
        with pytest.raises(MissingBlocks) as missing:
            manager.route()
        # the keyed servers' records are invisible: without a key only the intruder shows
        assert {s.peer_id for s in manager.spans()} <= {swarm.peer_id("intruder")}
        hint = "pass its key file with --swarm_key" if key == "none" else "not signed with this swarm key"
        assert hint in str(missing.value)
        first = PeerID.from_base58(swarm.peer_id("first"))
        with pytest.raises(Unauthorized) as refused:
            manager.loop.run(call_info(manager.p2p, first), timeout=30)
        expected = "did not prove that it holds the swarm key" if key == "none" else "different swarm key"
        assert expected in str(refused.value)
        hidden = torch.zeros(1, 2, local_hidden_size(tiny_gqa_dir))
        with pytest.raises(Unauthorized):
            manager.loop.run(call_forward(manager.p2p, first, 0, 3, hidden), timeout=30)
    finally:
        manager.shutdown()


def local_hidden_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["hidden_size"])


def test_unlisted_client_is_refused_by_the_server_with_allowed_peers(
    swarm: Swarm, keys: Keys, tiny_gqa_dir: Path
) -> None:
    model = client(tiny_gqa_dir, swarm, swarm_key=keys.swarm)  # a new peer id: not listed
    manager = model.manager
    try:
        me = manager.p2p.peer_id.to_base58()
        first, second = (PeerID.from_base58(swarm.peer_id(n)) for n in ("first", "second"))
        assert manager.loop.run(call_info(manager.p2p, first), timeout=30).start_block == 0
        with pytest.raises(Unauthorized, match=f"peer {me} is not in this server's --allowed_peers"):
            manager.loop.run(call_info(manager.p2p, second), timeout=30)
        with torch.no_grad(), pytest.raises(Unauthorized, match="--allowed_peers"):
            model.generate(prompt(2), max_new_tokens=2, do_sample=False)
    finally:
        manager.shutdown()


def test_forged_records_are_ignored(swarm: Swarm, keys: Keys) -> None:
    """An insider (it holds the swarm key) writes records naming the first server's peer id: plain,
    signed with its own key, and under the first server's own subkey without its signature."""
    victim = swarm.peer_id("first")
    uids = make_uids(PREFIX, 0, 6)
    forged = record(0, 6, public_name="forged", throughput=1e9).to_wire()
    swarm_key = load_swarm_key(keys.swarm)
    network = NetworkConfig(initial_peers=(swarm.peer,), host_maddrs=(LOOPBACK,), swarm_key=keys.swarm)
    forger = ServerIdentity.load_or_create(None)
    signer = start_dht(network, identity=forger)  # signs what its own owner marker names
    # no signature validator at all: it keeps whatever it writes, so readers meet the forgery there too
    raw = DHT(initial_peers=[swarm.peer], host_maddrs=[LOOPBACK], start=True,
              record_validators=[SwarmKeyValidator(swarm_key)])  # fmt: skip
    reader = start_dht(NetworkConfig(initial_peers=(swarm.peer,), swarm_key=keys.swarm), client_mode=True)
    try:
        found = signer.get(uids[0], latest=True, return_future=True).result(30)
        victim_subkey = next(k for k in found.value if k.startswith(victim))  # the first server's own
        expiration = get_dht_time() + 600  # later than the real record's: it would win if accepted
        own_marker = f"{victim}[owner:{forger.public_key.decode()}]"
        for uid in uids:  # (store's verdict is the last replica's: peers without the key refuse)
            signer.store(uid, forged, expiration, subkey=victim)  # unsigned: the DHT takes it
            signer.store(uid, forged, expiration, subkey=own_marker)  # signed, but by the forger's key
            raw.store(uid, forged, expiration, subkey=victim_subkey)  # the victim's subkey, no signature
        # the forger's own record (under its real peer id) is fine
        announce(signer, PREFIX, record(0, 1, public_name="forger"), 60, identity=forger)
        records = wait_for(
            lambda: fetch_block_records(reader, PREFIX, 6),
            lambda r: forger.peer_id in r[0] and r.unowned >= 2 * len(uids),
        )
        assert records[0][forger.peer_id].public_name == "forger"
        assert records.unowned >= 2 * len(uids)  # the plain and the wrongly signed ones: read, dropped
        assert records[0][victim].public_name == "first"
        assert all(info.public_name != "forged" for block in records for info in block.values())
        assert [victim in block for block in records] == [True] * 3 + [False] * 3
    finally:
        for dht in (signer, raw, reader):
            dht.shutdown()


def test_swarm_command_shows_only_the_closed_swarm(swarm: Swarm, keys: Keys) -> None:
    cmd = [sys.executable, "-m", "corolla.cli.main", "swarm", "--initial_peers", swarm.peer]
    cmd += ["--dht_prefix", PREFIX, "--num_blocks", "6", "--json", "--swarm_key", keys.swarm]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    names = {s["public_name"] for s in view["servers"]}
    assert {"first", "second"} <= names and not names & {"intruder", "forged"}  # (a "forger" may linger)
    assert view["uncovered_blocks"] == []
