"""Signed server records: whose announcement a record is, and why nobody else can write it.

A server's libp2p identity is an RSA key (the kind hivemind itself writes to ``--identity_path``
files), so its peer id is the SHA-256 multihash of that RSA public key. The same key signs its DHT
records with hivemind's ``RSASignatureValidator``:

* the record's subkey is ``PEER_ID[owner:ssh-rsa AAAA...]``: the peer id and the RSA public key;
* every DHT peer running the validator (every corolla peer does) stores and returns a record whose
  subkey carries an owner marker only if it is signed by that key, over (key, subkey, value,
  expiration); so only the key's holder can write or overwrite records under that subkey;
* readers (``corolla.swarm.registry``: clients, ``corolla swarm``, a server placing itself) accept only
  subkeys with an owner marker, recompute the peer id from the public key, and drop the record unless
  it equals the ``PEER_ID`` part. A record is then mapped to that peer id.

Guaranteed: a record read under peer id P was written by the holder of P's libp2p private key, the key
that the Noise handshake proves when a client connects to P. Nobody can announce under another
server's peer id or overwrite its records; replaying an old record of P cannot displace a newer one
(the DHT keeps, per subkey, the record with the latest expiration, and the expiration is signed).

Not guaranteed: that P is an honest server (anyone can make identities: in an open swarm anyone may
announce servers, under their own peer ids), that P's figures are true (a server may lie about
itself), that records reach the reader (a DHT peer may withhold them), or that stale-but-unexpired
records vanish early.

A server without ``--identity_path`` gets a fresh RSA identity per run (a new peer id, as before).
An ``--identity_path`` holding another kind of key (Ed25519) is refused: it cannot sign records.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from corolla.errors import ConfigError

_SUBKEY_RE = re.compile(r"^([1-9A-HJ-NP-Za-km-z]{20,128})\[owner:(ssh-rsa [A-Za-z0-9+/]+={0,2})\]$")
_SHA256_MULTIHASH = b"\x12\x20"


def peer_id_of(ssh_public_key: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key (OpenSSH format); ``ValueError`` if not RSA."""
    return _peer_id_of(bytes(ssh_public_key))


@functools.lru_cache(maxsize=4096)
def _peer_id_of(ssh_public_key: bytes) -> str:
    key = serialization.load_ssh_public_key(ssh_public_key)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return base58.b58encode(_SHA256_MULTIHASH + hashlib.sha256(encoded).digest()).decode()


def record_owner(subkey: object) -> str | None:
    """The peer id a record's subkey belongs to: ``PEER_ID[owner:KEY]`` where ``PEER_ID`` is KEY's
    peer id; None for anything else (unsigned, or claiming a peer id that is not the key's)."""
    if not isinstance(subkey, str):
        return None
    match = _SUBKEY_RE.match(subkey)
    if match is None:
        return None
    try:
        owner = peer_id_of(match.group(2).encode())
    except (ValueError, TypeError):
        return None
    return owner if owner == match.group(1) else None


def verifying_validator() -> RSASignatureValidator:
    """hivemind's record-signature validator for a peer that writes no signed records."""
    return RSASignatureValidator(RSAPrivateKey.process_wide())


@dataclass(frozen=True)
class ServerIdentity:
    """A server's RSA identity: its libp2p peer id and the key that signs its records.

    ``path`` is the identity file the P2P daemon reads; a ``temporary`` one (no ``--identity_path``)
    lives only until the daemon has started (``discard``)."""

    private_key: RSAPrivateKey
    path: str
    temporary: bool = False

    @classmethod
    def load_or_create(cls, identity_path: str | None) -> ServerIdentity:
        """The identity in ``identity_path`` (created there if missing), or a fresh temporary one."""
        if identity_path is None:
            directory = tempfile.mkdtemp(prefix="corolla-identity-")
            path = os.path.join(directory, "identity.key")
            P2P.generate_identity(path)
            identity = cls(_read_rsa_identity(path), path, temporary=True)
            atexit.register(identity.discard)  # also when the server exits before its daemon starts
            return identity
        if not os.path.exists(identity_path):
            try:
                P2P.generate_identity(identity_path)
            except OSError as e:
                raise ConfigError(f"--identity_path {identity_path}: cannot create it ({e})") from None
        return cls(_read_rsa_identity(identity_path), identity_path)

    @functools.cached_property
    def public_key(self) -> bytes:
        """The RSA public key in OpenSSH format (what the owner marker carries)."""
        return self.private_key.get_public_key().to_bytes()

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    @property
    def subkey(self) -> str:
        """The subkey of this server's records: its peer id and its owner marker."""
        return f"{self.peer_id}[owner:{self.public_key.decode()}]"

    def validator(self) -> RSASignatureValidator:
        """hivemind's validator that signs this server's records (and checks everyone's)."""
        return RSASignatureValidator(self.private_key)

    def discard(self) -> None:
        """Remove a temporary identity file (the running daemon has read it already)."""
        if self.temporary:
            with contextlib.suppress(OSError):
                shutil.rmtree(os.path.dirname(self.path))


def _read_rsa_identity(path: str) -> RSAPrivateKey:
    try:
        data = Path(path).read_bytes()
        proto = crypto_pb2.PrivateKey.FromString(data)
    except OSError as e:
        raise ConfigError(f"--identity_path {path}: cannot read it ({e.strerror or e})") from None
    except Exception:
        raise ConfigError(f"--identity_path {path} is not a libp2p identity file") from None
    if proto.key_type != crypto_pb2.RSA:
        try:
            kind = crypto_pb2.KeyType.Name(proto.key_type)
        except ValueError:
            kind = "unknown"
        raise ConfigError(
            f"--identity_path {path} holds an {kind} key; a server signs its DHT records with an RSA "
            "identity: give a new file name and corolla creates one"
        )
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    try:
        key.__setstate__({"_private_key": proto.data})  # hivemind's own (pickling) constructor
    except Exception:
        raise ConfigError(f"--identity_path {path} holds a damaged RSA key") from None
    return key
