"""Multiaddrs as the P2P daemon reads them, and relay (``/p2p-circuit``) addresses.

hivemind's bundled ``Multiaddr`` encodes a ``/p2p/PEER`` part as a CID, which the Go daemon
rejects when it gets the address in binary ("length greater than remaining number of bytes in
buffer"): dialing a peer through a relay (``/ip4/R/tcp/P/p2p/RELAY/p2p-circuit``) needs the
relay's peer id as a plain multihash. ``daemon_maddr`` writes every ``/p2p/`` part that way.
"""

from __future__ import annotations

from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

P2P_CODE = 421  # multicodec "p2p"
CIRCUIT_CODE = 290  # multicodec "p2p-circuit"
CIRCUIT = "/p2p-circuit"


def varint(n: int) -> bytes:
    """``n`` as an unsigned LEB128 varint (multiaddr codes, protobuf keys and lengths)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def daemon_maddr(text: str) -> Multiaddr:
    """``text`` as a ``Multiaddr`` whose bytes the Go daemon reads: ``/p2p/ID`` parts as multihashes,
    ``/p2p-circuit`` as the bare code. ``ValueError`` for a malformed address."""
    parts = text.split("/")
    if not text.startswith("/") or parts[-1] == "":
        raise ValueError(f"not a multiaddr: {text!r}")
    out, i, plain = bytearray(), 1, []

    def flush() -> None:
        if plain:
            out.extend(Multiaddr("/" + "/".join(plain)).to_bytes())
            plain.clear()

    while i < len(parts):
        name = parts[i]
        if name == "p2p" and i + 1 < len(parts):
            flush()
            digest = PeerID.from_base58(parts[i + 1]).to_bytes()
            if len(digest) < 3 or digest[0] not in (0x00, 0x12) or digest[1] != len(digest) - 2:
                raise ValueError(f"not a peer id: {parts[i + 1]!r}")  # identity or sha2-256 multihash
            out += varint(P2P_CODE) + varint(len(digest)) + digest
            i += 2
        elif name == "p2p-circuit":
            flush()
            out += varint(CIRCUIT_CODE)
            i += 1
        else:
            plain.append(name)
            i += 1
    flush()
    return Multiaddr(bytes(out))


def is_relayed(addr: str) -> bool:
    """Whether an announced address reaches its peer through a relay."""
    return CIRCUIT in addr


def circuit_addrs(relays: list[str]) -> list[str]:
    """The addresses through which a peer holding reservations on ``relays`` (full multiaddrs
    ``.../p2p/RELAY``) can be dialed: ``RELAY_ADDR/p2p/RELAY/p2p-circuit``."""
    return [f"{relay}{CIRCUIT}" for relay in relays if "/p2p/" in relay and CIRCUIT not in relay]


def peer_of(maddr: str) -> str | None:
    """The peer id a full multiaddr ends with (``.../p2p/ID``), or None."""
    head, sep, peer = maddr.rpartition("/p2p/")
    return peer if sep and head and "/" not in peer else None
