"""Closed swarms and signed records, without a network: RPC proofs, the record validators, access
policies, key and identity files, and how readers map signed records to peer ids."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer

from corolla.cli import keygen, run_dht
from corolla.cli.args import server_parser
from corolla.errors import ConfigError, Unauthorized
from corolla.protocol.messages import RPC_FORWARD, RPC_INFO, RPC_PUSH
from corolla.swarm.auth import (
    AccessPolicy,
    SwarmKey,
    SwarmKeyValidator,
    bind_swarm_key,
    load_allowed_peers,
    load_swarm_key,
    parse_peer_id,
    rejected_records,
    sign_request,
    write_swarm_key,
)
from corolla.swarm.dht import record_validators
from corolla.swarm.identity import ServerIdentity, peer_id_of, record_owner
from corolla.swarm.registry import fetch_block_records, foreign_records_hint
from helpers.swarm import record

KEY = SwarmKey(b"k" * 32)
OTHER = SwarmKey(b"o" * 32)


@pytest.fixture(scope="module")
def identity() -> Iterator[ServerIdentity]:
    made = ServerIdentity.load_or_create(None)
    yield made
    made.discard()  # its temporary file


@pytest.fixture(scope="module")
def other_identity() -> Iterator[ServerIdentity]:
    made = ServerIdentity.load_or_create(None)
    yield made
    made.discard()


def peer(identity: ServerIdentity) -> PeerID:
    return PeerID.from_base58(identity.peer_id)


def dht_record(subkey: str = "sub", value: Any = None, expiration: float = 1234.5) -> DHTRecord:
    value = {"state": 2} if value is None else value
    return DHTRecord(
        b"\x01" * 20, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration
    )


# --- RPC proofs -----------------------------------------------------------------------------------


def test_rpc_proof_is_bound_to_caller_callee_rpc_and_key() -> None:
    proof = KEY.rpc_proof(b"alice", b"bob", RPC_FORWARD)
    assert KEY.check_rpc_proof(proof, b"alice", b"bob", RPC_FORWARD)
    assert not KEY.check_rpc_proof(proof, b"mallory", b"bob", RPC_FORWARD)  # stolen by another caller
    assert not KEY.check_rpc_proof(proof, b"alice", b"carol", RPC_FORWARD)  # replayed by bob to carol
    assert not KEY.check_rpc_proof(proof, b"alice", b"bob", RPC_INFO)
    assert not OTHER.check_rpc_proof(proof, b"alice", b"bob", RPC_FORWARD)
    assert not KEY.check_rpc_proof("", b"alice", b"bob", RPC_FORWARD)
    # field boundaries count: ("ab", "c") and ("a", "bc") differ
    assert KEY.rpc_proof(b"ab", b"c", "x") != KEY.rpc_proof(b"a", b"bc", "x")


def test_signed_requests_pass_the_callee_policy(
    identity: ServerIdentity, other_identity: ServerIdentity
) -> None:
    caller, callee = peer(identity), peer(other_identity)
    p2p = SimpleNamespace(peer_id=caller)
    policy = AccessPolicy(swarm_key=KEY)
    request = runtime_pb2.ExpertRequest()
    assert sign_request(request, p2p, callee, RPC_INFO).uid == ""  # not bound: no proof
    bind_swarm_key(p2p, KEY)
    try:
        sign_request(request, p2p, callee, RPC_INFO)
        policy.check(RPC_INFO, request.uid, caller, callee)
        with pytest.raises(Unauthorized, match="different swarm key"):
            AccessPolicy(swarm_key=OTHER).check(RPC_INFO, request.uid, caller, callee)
        with pytest.raises(Unauthorized, match="different swarm key"):
            policy.check(RPC_FORWARD, request.uid, caller, callee)  # a proof for another RPC
    finally:
        bind_swarm_key(p2p, None)
    assert sign_request(runtime_pb2.ExpertRequest(), p2p, callee, RPC_INFO).uid == ""
    with pytest.raises(Unauthorized, match=f"peer {caller.to_base58()} did not prove .* --swarm_key"):
        policy.check(RPC_INFO, "", caller, callee)


def test_allowed_peers_policy_exempts_only_pushes(
    identity: ServerIdentity, other_identity: ServerIdentity
) -> None:
    listed, stranger, me = peer(identity), peer(other_identity), PeerID(b"\x00\x03abc")
    policy = AccessPolicy(allowed_peers=frozenset({listed.to_base58()}))
    policy.check(RPC_FORWARD, "", listed, me)
    with pytest.raises(Unauthorized, match=f"peer {stranger.to_base58()} is not in .*--allowed_peers"):
        policy.check(RPC_FORWARD, "", stranger, me)
    policy.check(RPC_PUSH, "", stranger, me)  # another server's push
    both = AccessPolicy(swarm_key=KEY, allowed_peers=policy.allowed_peers)
    with pytest.raises(Unauthorized, match="swarm key"):  # pushes still need the swarm key
        both.check(RPC_PUSH, "", stranger, me)
    both.check(RPC_PUSH, KEY.rpc_proof(stranger.to_bytes(), me.to_bytes(), RPC_PUSH), stranger, me)
    assert AccessPolicy().open and not both.open


# --- the record validators ------------------------------------------------------------------------


def test_swarm_key_validator_tags_and_checks_records() -> None:
    keyed, other, open_ = SwarmKeyValidator(KEY), SwarmKeyValidator(OTHER), SwarmKeyValidator(None)
    plain = dht_record()
    tagged = dataclasses.replace(plain, value=keyed.sign_value(plain))
    assert tagged.value != plain.value
    assert keyed.validate(tagged) and keyed.strip_value(tagged) == plain.value
    for changed in (
        dataclasses.replace(tagged, subkey=MSGPackSerializer.dumps("other")),
        dataclasses.replace(tagged, expiration_time=plain.expiration_time + 1),
        dataclasses.replace(tagged, key=b"\x02" * 20),
        dataclasses.replace(tagged, value=MSGPackSerializer.dumps({"state": 0}) + tagged.value[-52:]),
    ):
        assert not keyed.validate(changed)
    assert not keyed.validate(plain)  # no tag: a record of a peer without the key
    assert not other.validate(tagged)  # another swarm's key
    assert not open_.validate(tagged) and open_.validate(plain)  # open peers leave closed swarms alone
    assert open_.sign_value(plain) == plain.value and open_.strip_value(plain) == plain.value
    assert (keyed.rejected, other.rejected, open_.rejected) == (5, 1, 1)
    assert rejected_records(CompositeValidator([keyed, other])) == 6


def test_validators_compose_signature_inside_the_swarm_tag(
    identity: ServerIdentity, other_identity: ServerIdentity
) -> None:
    """As in a server's DHT peer: hivemind's RSA signature is made first and checked last."""
    writer = CompositeValidator(record_validators(KEY, identity))
    reader = CompositeValidator(record_validators(KEY))
    record_ = dht_record(subkey=identity.subkey)
    signed = dataclasses.replace(record_, value=writer.sign_value(record_))
    assert b"[signature:" in signed.value and signed.value.endswith(b"]")
    assert reader.validate(signed) and reader.strip_value(signed) == record_.value
    # the same value claimed under another owner's subkey fails the signature, though its tag is valid
    stolen = dht_record(subkey=other_identity.subkey)
    retagged = SwarmKeyValidator(KEY).sign_value(dataclasses.replace(stolen, value=signed.value[:-52]))
    assert not reader.validate(dataclasses.replace(stolen, value=retagged))
    # a closed swarm's signed record is refused by an open peer
    assert not CompositeValidator(record_validators(None)).validate(signed)
    # installing the same validators twice merges them: still one tag and one signature
    twice = CompositeValidator([*record_validators(KEY, identity), *record_validators(KEY)])
    value = twice.sign_value(record_)
    assert value.count(b"[signature:") == 1 and value.count(b"[swarm:") == 1
    assert twice.validate(dataclasses.replace(record_, value=value))
    assert any(isinstance(v, RSASignatureValidator) for v in twice._validators)


def test_undecodable_values_are_refused_not_hung_on() -> None:
    """hivemind would hang a lookup on a value it cannot decode: refuse it like an invalid record."""
    validators = CompositeValidator(record_validators(KEY))
    good, garbage = dht_record(), dataclasses.replace(dht_record(), value=b"\xc1 not msgpack")
    for plain in (good, garbage):
        tagged = dataclasses.replace(plain, value=validators.sign_value(plain))
        assert validators.validate(tagged) is (plain is good)


# --- identities and record owners -----------------------------------------------------------------


def test_server_identity_is_the_peer_id_of_its_record_key(identity: ServerIdentity) -> None:
    data = Path(identity.path).read_bytes() if os.path.exists(identity.path) else None
    fresh = ServerIdentity.load_or_create(None)
    assert fresh.temporary and os.path.exists(fresh.path)
    assert PeerID.from_identity(Path(fresh.path).read_bytes()).to_base58() == fresh.peer_id
    fresh.discard()
    assert not os.path.exists(fresh.path)
    assert data is None or PeerID.from_identity(data).to_base58() == identity.peer_id
    assert identity.peer_id.startswith("Qm") and identity.subkey.startswith(
        identity.peer_id + "[owner:ssh-rsa "
    )
    assert peer_id_of(identity.public_key) == identity.peer_id


def test_record_owner_needs_the_peer_ids_own_key(
    identity: ServerIdentity, other_identity: ServerIdentity
) -> None:
    assert record_owner(identity.subkey) == identity.peer_id
    mismatched = f"{identity.peer_id}[owner:{other_identity.public_key.decode()}]"
    assert record_owner(mismatched) is None  # someone else's key claiming this peer id
    assert record_owner(identity.peer_id) is None  # unsigned, the old format
    assert record_owner(identity.subkey + "x") is None
    assert record_owner(b"bytes") is None and record_owner(None) is None
    assert record_owner(f"{identity.peer_id}[owner:ssh-rsa AAAA]") is None  # not a key


def test_identity_files(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    created = ServerIdentity.load_or_create(str(path))
    assert not created.temporary and path.exists()
    assert ServerIdentity.load_or_create(str(path)).peer_id == created.peer_id
    ed25519 = tmp_path / "ed25519.key"
    ed25519.write_bytes(
        crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=b"\0" * 64).SerializeToString()
    )
    with pytest.raises(ConfigError, match="holds an Ed25519 key; a server signs its DHT records with an RSA"):
        ServerIdentity.load_or_create(str(ed25519))
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\xff" * 10)
    with pytest.raises(ConfigError, match="not a libp2p identity file"):
        ServerIdentity.load_or_create(str(garbage))


# --- key and peer-list files ----------------------------------------------------------------------


def test_swarm_key_files(tmp_path: Path) -> None:
    assert load_swarm_key(None) is None
    key = write_swarm_key(tmp_path / "swarm.key")
    assert (tmp_path / "swarm.key").stat().st_mode & 0o777 == 0o600
    assert len((tmp_path / "swarm.key").read_bytes()) == 32
    assert load_swarm_key(tmp_path / "swarm.key") == key
    with pytest.raises(ConfigError, match="exists already"):
        write_swarm_key(tmp_path / "swarm.key")
    text = tmp_path / "text.key"
    text.write_text("a passphrase of some length\n")
    assert load_swarm_key(text) == SwarmKey(b"a passphrase of some length")  # the newline is ignored
    with pytest.raises(ConfigError, match=r"--swarm_key .*missing.key: cannot read it .*corolla keygen"):
        load_swarm_key(tmp_path / "missing.key")
    (tmp_path / "empty.key").write_bytes(b"")
    with pytest.raises(ConfigError, match="is empty; make one with 'corolla keygen FILE'"):
        load_swarm_key(tmp_path / "empty.key")
    (tmp_path / "short.key").write_bytes(b"short")
    with pytest.raises(ConfigError, match="holds only 5 bytes"):
        load_swarm_key(tmp_path / "short.key")
    with pytest.raises(ConfigError, match="cannot read it"):
        load_swarm_key(tmp_path)  # a directory
    assert KEY.fingerprint != OTHER.fingerprint and len(KEY.fingerprint) == 8


def test_allowed_peers_files(tmp_path: Path, identity: ServerIdentity) -> None:
    ed25519_id = "12D3KooWDyQ8cM8jaPLqNDHYxwmrB6fD13Hnp52TW4DCxSW74gkA"
    path = tmp_path / "allowed.txt"
    path.write_text(f"# our clients\n\n{identity.peer_id}\n  {ed25519_id}  # the laptop\n")
    assert load_allowed_peers(path) == frozenset({identity.peer_id, ed25519_id})
    assert load_allowed_peers(None) is None
    path.write_text(f"{identity.peer_id}\nnot-a-peer-id\n")
    with pytest.raises(ConfigError, match="line 2: 'not-a-peer-id' is not a peer id"):
        load_allowed_peers(path)
    path.write_text("# nobody yet\n")
    with pytest.raises(ConfigError, match="lists no peer ids"):
        load_allowed_peers(path)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_allowed_peers(tmp_path / "missing.txt")
    assert parse_peer_id(ed25519_id) is not None and parse_peer_id("QmTooShort") is None


# --- readers --------------------------------------------------------------------------------------


class FakeDHT:
    """Answers ``run_coroutine`` with fixed records: {uid: {subkey: value}} and a refusal count."""

    def __init__(self, found: dict[str, dict[Any, Any]], foreign: int = 0) -> None:
        self.answer = (found, foreign)

    def run_coroutine(self, coro: Any, return_future: bool = False) -> Future:
        future: Future = Future()
        future.set_result(self.answer)
        return future


def test_fetch_maps_signed_subkeys_to_peer_ids(
    identity: ServerIdentity, other_identity: ServerIdentity
) -> None:
    info = record(0, 2).to_wire()
    mismatched = f"{identity.peer_id}[owner:{other_identity.public_key.decode()}]"
    found = {
        "p.0": {identity.subkey: info, identity.peer_id: info, mismatched: info},
        "p.1": {identity.subkey: info, other_identity.subkey: record(1, 2).to_wire()},
    }
    records = fetch_block_records(FakeDHT(found, foreign=3), "p", 3)  # type: ignore[arg-type]
    assert [sorted(block) for block in records] == [
        [identity.peer_id],
        sorted([identity.peer_id, other_identity.peer_id]),
        [],
    ]
    assert (records.unowned, records.foreign) == (2, 3)
    assert "pass its key file with --swarm_key" in (foreign_records_hint(records, keyed=False) or "")
    assert "not signed with this swarm key" in (foreign_records_hint(records, keyed=True) or "")
    assert foreign_records_hint([], keyed=True) is None


# --- the server's entry points --------------------------------------------------------------------


def test_every_rpc_entry_refuses_a_caller_without_the_key(
    identity: ServerIdentity, other_identity: ServerIdentity
) -> None:
    import asyncio

    from hivemind.p2p import P2PContext

    from corolla.config import LimitsConfig
    from corolla.protocol.messages import RPC_BACKWARD, RPC_INFERENCE, RPC_PING, Reply
    from corolla.server.handler import Handler

    caller, me = peer(identity), peer(other_identity)
    handler = Handler(LimitsConfig(), dht_prefix="p", hidden_size=8, access=AccessPolicy(swarm_key=KEY))

    def kind(response: runtime_pb2.ExpertResponse) -> str | None:
        error = Reply.model_validate_json(response.metadata or b"{}").error
        return error.kind if error is not None else None

    async def call(rpc: str, proof: str = "") -> str | None:
        context = P2PContext(handle_name=rpc, local_id=me, remote_id=caller)
        request = runtime_pb2.ExpertRequest(uid=proof)
        unary = {RPC_PING: handler.rpc_ping, RPC_INFO: handler.rpc_info, RPC_PUSH: handler.rpc_push}
        if rpc in unary:
            return kind(await unary[rpc](request, context))

        async def one() -> Any:
            yield request

        streams = {
            RPC_FORWARD: handler.rpc_forward,
            RPC_BACKWARD: handler.rpc_backward,
            RPC_INFERENCE: handler.rpc_inference,
        }
        return kind(await anext(streams[rpc](one(), context)))

    async def main() -> None:
        for rpc in (RPC_PING, RPC_INFO, RPC_PUSH, RPC_FORWARD, RPC_BACKWARD, RPC_INFERENCE):
            assert await call(rpc) == "Unauthorized", rpc
            assert await call(rpc, KEY.rpc_proof(caller.to_bytes(), me.to_bytes(), rpc)) != "Unauthorized"
        assert await call(RPC_PING, KEY.rpc_proof(caller.to_bytes(), me.to_bytes(), RPC_PING)) is None

    asyncio.run(main())


# --- the command line -----------------------------------------------------------------------------


def test_serve_help_shows_the_access_flags() -> None:
    text = server_parser().format_help()
    assert "--swarm_key SWARM_KEY" in text and "--allowed_peers ALLOWED_PEERS" in text


def test_keygen_and_a_dht_peer_refusing_a_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keygen.main([str(tmp_path / "swarm.key")]) == 0
    assert "fingerprint" in capsys.readouterr().out
    assert keygen.main([str(tmp_path / "swarm.key")]) == 2
    assert "exists already" in capsys.readouterr().err
    assert keygen.main(["--identity", str(tmp_path / "id.key")]) == 0
    peer_id = capsys.readouterr().out.split()[0]
    assert peer_id == ServerIdentity.load_or_create(str(tmp_path / "id.key")).peer_id
    (tmp_path / "empty.key").write_bytes(b"")
    assert run_dht.main(["--swarm_key", str(tmp_path / "empty.key")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("corolla dht: error: --swarm_key") and "is empty" in err[-1]
