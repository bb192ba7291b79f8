"""Closed swarms: a shared swarm key decides who takes part; an allow-list decides whom a server answers.

Without ``--swarm_key`` a swarm is open, as before: anyone who can reach a peer may read the DHT,
announce a server and call any server. With ``--swarm_key FILE`` (the same secret on every peer:
``corolla keygen swarm.key`` or ``head -c 32 /dev/urandom > swarm.key``) only peers that prove they
hold the key take part.

What is authenticated, and how
------------------------------
libp2p authenticates both ends of every connection (Noise): a server's handler knows the caller's
peer id (``P2PContext.remote_id``) for sure, and the caller knows it reached the peer id it dialled.
On top of that:

* **RPCs.** A caller attaches ``HMAC-SHA256(K_rpc, caller peer id | callee peer id | RPC name)`` in the
  request's ``uid`` field (unused by corolla otherwise; on streams, in the first message). The server
  recomputes it from the authenticated ``remote_id`` and its own id and refuses a missing or wrong
  proof with ``corolla.errors.Unauthorized``. The proof is useless to anyone else: it names the caller
  (whose libp2p key a thief lacks), the callee (a server that received it cannot use it to call a third
  one) and the RPC, and it only travels inside Noise-encrypted streams. Every RPC is checked: ``info``,
  ``ping``, ``forward``, ``backward``, ``inference`` and the server-to-server ``push``.
* **DHT records.** ``SwarmKeyValidator`` (a hivemind record validator, installed in every corolla DHT
  peer) appends ``[swarm:HMAC-SHA256(K_dht, key | subkey | value | expiration)]`` to every record this
  peer stores and drops every record without a valid tag, both when another peer asks to store it and
  when a lookup returns it. Keyed peers therefore never keep nor read records of peers without the key
  (a server without the key cannot announce itself into the swarm), and a peer without the key (or with
  a wrong one) ignores the swarm's records: its lookups find no servers. It is the outermost validator
  (highest priority): the tag covers the record signature of ``corolla.swarm.identity``.
* **Allowed peers.** ``--allowed_peers FILE`` (one base58 peer id per line, ``#`` comments) makes a
  server answer only the listed peer ids; others get ``Unauthorized``. It checks the Noise-authenticated
  caller id, so it needs no swarm key (clients get a stable peer id with ``--identity_path``). Pushes
  from other servers are exempt: a push only delivers hidden states into a session that a listed client
  opened here, addressed by that session's random 128-bit id, which the client gives only to the
  previous server of its chain; the swarm key, when there is one, still applies to pushes.

The keys ``K_rpc`` and ``K_dht`` are derived from the file's bytes (HMAC-SHA256 with a label each), so
the two uses never share a key; the fingerprint logged at start-up tells mismatched key files apart.

What is not protected
---------------------
* Confidentiality of records: tags authenticate, they do not encrypt. Whoever reaches a DHT peer can
  read the swarm's records (peer ids, spans, names) with a tool of their own; they cannot add to them.
* The DHT's own traffic (hivemind's ping/find/store RPCs carry no proof): a peer without the key can
  still join the routing tables, relay lookups, and withhold or drop records (availability, not
  integrity). Keyed peers store nothing it writes.
* Insiders: a peer holding the key is fully trusted as a member. It can run servers, and a server may
  lie about its own figures (throughput, free cache) or compute wrong outputs. Record signatures
  (``corolla.swarm.identity``) stop it from writing under another server's peer id, not from lying
  about itself.
* Freshness of proofs: an RPC proof is deterministic; that is safe only because it is bound to the
  caller's authenticated peer id. Whoever steals a peer's identity file and the swarm key can act as
  that peer; whoever steals the key file alone can join as a new peer (rotate the key: a new file for
  every peer).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import base58
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from corolla.errors import ConfigError, Unauthorized
from corolla.protocol.messages import RPC_PUSH

SWARM_KEY_BYTES = 32  # what ``corolla keygen`` writes
MIN_SWARM_KEY_BYTES = 16
KEYGEN_HINT = "make one with 'corolla keygen FILE' (or head -c 32 /dev/urandom > FILE)"
# RPCs a server answers without --allowed_peers listing the caller (see the module docstring)
ALLOWED_PEERS_EXEMPT = frozenset({RPC_PUSH})


def _derive(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, label, hashlib.sha256).digest()


def _fields(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different field lists give the same bytes."""
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


class SwarmKey:
    """A swarm's shared secret, with one derived key per use."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SWARM_KEY_BYTES:
            raise ConfigError(f"a swarm key needs at least {MIN_SWARM_KEY_BYTES} bytes; {KEYGEN_HINT}")
        self._rpc = _derive(secret, b"corolla swarm key: rpc proofs v1")
        self._dht = _derive(secret, b"corolla swarm key: dht records v1")
        self.fingerprint = _derive(secret, b"corolla swarm key: fingerprint v1")[:4].hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SwarmKey) and hmac.compare_digest(self._dht, other._dht)

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"SwarmKey(fingerprint={self.fingerprint})"

    # --- RPC proofs ---------------------------------------------------------------------------

    def rpc_proof(self, caller: bytes, callee: bytes, rpc: str) -> str:
        """The proof ``caller`` attaches to a call of ``rpc`` on ``callee`` (raw peer id bytes)."""
        digest = hmac.new(self._rpc, _fields(caller, callee, rpc.encode()), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()

    def check_rpc_proof(self, proof: str, caller: bytes, callee: bytes, rpc: str) -> bool:
        return hmac.compare_digest(proof.encode(), self.rpc_proof(caller, callee, rpc).encode())

    # --- DHT records --------------------------------------------------------------------------

    def record_tag(self, record: DHTRecord) -> bytes:
        expiration = struct.pack(">d", record.expiration_time)
        message = _fields(record.key, record.subkey, record.value, expiration)
        return base64.b64encode(hmac.new(self._dht, message, hashlib.sha256).digest())


def load_swarm_key(path: str | os.PathLike[str] | None) -> SwarmKey | None:
    """The key in ``path`` (None: an open swarm); ``ConfigError`` in one line for a file that cannot
    serve as a key. Trailing newlines are ignored, so a key typed into a text file works everywhere."""
    if path is None:
        return None
    try:
        secret = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise ConfigError(f"--swarm_key {path}: cannot read it ({e.strerror or e}); {KEYGEN_HINT}") from None
    if not secret:
        raise ConfigError(f"--swarm_key {path} is empty; {KEYGEN_HINT}")
    if len(secret) < MIN_SWARM_KEY_BYTES:
        raise ConfigError(
            f"--swarm_key {path} holds only {len(secret)} bytes, fewer than {MIN_SWARM_KEY_BYTES}; "
            + KEYGEN_HINT
        )
    return SwarmKey(secret)


def write_swarm_key(path: str | os.PathLike[str]) -> SwarmKey:
    """Write a new random key to ``path`` (readable by its owner only); never overwrites a file."""
    secret = os.urandom(SWARM_KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists already; remove it first or choose another name") from None
    except OSError as e:
        raise ConfigError(f"cannot create {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return SwarmKey(secret)


# --- the DHT record validator ---------------------------------------------------------------------

_TAG_RE = re.compile(rb"\[swarm:([A-Za-z0-9+/]{43}=)\]\Z")


class SwarmKeyValidator(RecordValidatorBase):
    """Tags every record this peer stores with the swarm key and accepts only correctly tagged ones.

    Without a key (an open swarm) it accepts untagged records only: a closed swarm's records are not
    ours to keep or to read. ``rejected`` counts refusals (``registry`` turns them into a hint)."""

    def __init__(self, key: SwarmKey | None) -> None:
        self.key = key
        self.rejected = 0

    @staticmethod
    def _split(value: bytes) -> tuple[bytes, bytes | None]:
        match = _TAG_RE.search(value)
        return (value, None) if match is None else (value[: match.start()], match.group(1))

    def validate(self, record: DHTRecord) -> bool:
        body, tag = self._split(record.value)
        if self.key is None:
            ok = tag is None
        else:
            ok = tag is not None and hmac.compare_digest(
                tag, self.key.record_tag(dataclasses.replace(record, value=body))
            )
        if not ok:
            self.rejected += 1
        return ok

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.key is None:
            return record.value
        return record.value + b"[swarm:" + self.key.record_tag(record) + b"]"

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value if self.key is None else self._split(record.value)[0]

    @property
    def priority(self) -> int:
        return 100  # outermost: signs after, validates before hivemind's RSASignatureValidator (10)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        # the same key twice is one validator; different keys stay apart, and no record passes both
        return isinstance(other, SwarmKeyValidator) and other.key == self.key


def rejected_records(validator: Any) -> int:
    """Records refused so far by the ``SwarmKeyValidator`` inside a DHT node's (composite) validator."""
    parts = getattr(validator, "_validators", [validator])
    return sum(v.rejected for v in parts if isinstance(v, SwarmKeyValidator))


# --- RPC proofs on the wire -----------------------------------------------------------------------

_BOUND: dict[str, SwarmKey] = {}  # this process's peer ids (base58) -> the swarm key they prove


def bind_swarm_key(p2p: Any, key: SwarmKey | None) -> None:
    """Make calls from ``p2p`` (a hivemind ``P2P``) carry proofs of ``key`` (None: no proofs)."""
    peer = p2p.peer_id.to_base58()
    if key is None:
        _BOUND.pop(peer, None)
    else:
        _BOUND[peer] = key


def sign_request(request: Any, p2p: Any, peer_id: Any, rpc: str) -> Any:
    """Put the caller's proof for ``rpc`` on ``peer_id`` into ``request.uid`` (when ``p2p`` is bound
    to a swarm key); returns ``request``."""
    key = _BOUND.get(p2p.peer_id.to_base58())
    if key is not None:
        request.uid = key.rpc_proof(p2p.peer_id.to_bytes(), peer_id.to_bytes(), rpc)
    return request


# --- who a server answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessPolicy:
    """A server's rules: callers must prove ``swarm_key`` (if any) and be in ``allowed_peers`` (if any)."""

    swarm_key: SwarmKey | None = None
    allowed_peers: frozenset[str] | None = None

    @property
    def open(self) -> bool:
        return self.swarm_key is None and self.allowed_peers is None

    def check(self, rpc: str, proof: str, caller: Any, callee: Any) -> None:
        """``Unauthorized`` unless ``caller`` (authenticated ``PeerID``) may call ``rpc`` here."""
        if self.swarm_key is not None and not self.swarm_key.check_rpc_proof(
            proof, caller.to_bytes(), callee.to_bytes(), rpc
        ):
            raise Unauthorized(
                f"this server belongs to a closed swarm and peer {caller.to_base58()} did not prove that "
                "it holds the swarm key; pass the swarm's key file with --swarm_key (swarm_key= in Python)"
                if not proof
                else f"peer {caller.to_base58()} proved a different swarm key than this server's; "
                "check that --swarm_key is the swarm's key file"
            )
        if (
            self.allowed_peers is not None
            and rpc not in ALLOWED_PEERS_EXEMPT
            and caller.to_base58() not in self.allowed_peers
        ):
            raise Unauthorized(
                f"peer {caller.to_base58()} is not in this server's --allowed_peers; ask its operator to add "
                "this peer id (a client keeps one peer id with --identity_path)"
            )


_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]+$")


def parse_peer_id(text: str) -> bytes | None:
    """The raw bytes of a base58 libp2p peer id (an identity or sha2-256 multihash), or None."""
    if not _BASE58.match(text):
        return None
    raw = base58.b58decode(text)
    if len(raw) < 3 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2:
        return None
    return raw


def load_allowed_peers(path: str | os.PathLike[str] | None) -> frozenset[str] | None:
    """The peer ids listed in ``path`` (None: everyone is allowed). One base58 peer id per line;
    ``#`` starts a comment; blank lines are ignored. ``ConfigError`` in one line for a bad file."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(f"--allowed_peers {path}: cannot read it ({reason})") from None
    peers: set[str] = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if parse_peer_id(text) is None:
            raise ConfigError(
                f"--allowed_peers {path}, line {number}: {text[:60]!r} is not a peer id "
                "(one base58 peer id per line, such as 12D3KooW... or Qm...; # starts a comment)"
            )
        peers.add(text)
    if not peers:
        raise ConfigError(f"--allowed_peers {path} lists no peer ids; this server would answer nobody")
    return frozenset(peers)


def describe(policy: AccessPolicy, allowed_path: str | None = None) -> Iterable[str]:
    """Log lines stating the policy (for the server's start-up log; ``start_dht`` logs the swarm key)."""
    if policy.allowed_peers is not None:
        yield (
            f"answering only the {len(policy.allowed_peers)} peer(s) of --allowed_peers {allowed_path or ''}"
            " (pushes from other servers are exempt)"
        )
