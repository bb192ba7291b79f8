"""Can peers dial this one? Asked of swarm peers, answered by a fresh connection.

A new server asks a few peers (its ``--initial_peers``) to dial it back (``corolla.dial_back``).
Each helper dials from a *probe*: a P2P daemon of its own that listens nowhere and holds no
connection to the asker, so an existing connection (made outwards, through the asker's NAT)
cannot make an unreachable peer look reachable. The asker is reachable when at least half of the
peers that answered could dial it. A helper dials only the asker's own peer id, at no more than
``MAX_ADDRS`` addresses, so it cannot be used to scan others.

Every corolla peer that serves (servers, ``corolla dht``) answers these requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from pydantic import Field

from corolla.protocol.messages import RPC_PING, Message
from corolla.swarm.maddrs import daemon_maddr, peer_of

logger = logging.getLogger(__name__)

RPC_DIAL_BACK = "corolla.dial_back"
MAX_ADDRS = 8
DIAL_TIMEOUT = 5.0  # seconds a helper tries to dial the asker
ASK_TIMEOUT = 10.0  # seconds the asker waits for one helper's answer
MAX_HELPERS = 5
PROBE_IDLE = 120.0  # seconds a helper keeps its probe daemon after the last request


class _ClosingNoise(logging.Filter):
    """Drops what a probe daemon says while it is being closed: it accepts on a socket that its own
    shutdown closes, and logs that as an error ("use of closed network connection")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "use of closed network connection" not in record.getMessage()


logging.getLogger("hivemind.p2p.p2p_daemon").addFilter(_ClosingNoise())


class DialBackRequest(Message):
    addrs: tuple[str, ...] = Field(min_length=1, max_length=MAX_ADDRS)


class DialBackReply(Message):
    reachable: bool
    seconds: float = Field(ge=0)


@dataclass(frozen=True)
class Reachability:
    """What the peers asked said: ``direct`` is None when nobody answered."""

    direct: bool | None
    asked: int
    answered: int
    dialed: int

    def describe(self) -> str:
        return f"{self.dialed}/{self.answered} peers dialed back" + (
            f", {self.asked - self.answered} did not answer" if self.asked > self.answered else ""
        )


def verdict(answers: Sequence[bool | None]) -> Reachability:
    """Pure: reachable when at least half of the peers that answered could dial (None: no answer)."""
    answered = [a for a in answers if a is not None]
    dialed = sum(answered)
    direct = None if not answered else dialed * 2 >= len(answered)
    return Reachability(direct, len(answers), len(answered), dialed)


class DialBackService:
    """Answers ``corolla.dial_back`` on a peer's P2P: dials the asker from a probe daemon."""

    def __init__(self) -> None:
        self._probe: P2P | None = None
        self._lock = asyncio.Lock()
        self._last_used = 0.0
        self._reaper: asyncio.Task[None] | None = None

    async def register(self, p2p: P2P, *, answer_pings: bool = False) -> None:
        """Answer dial-back requests on ``p2p``; with ``answer_pings`` (a peer without a server's
        handler, ``corolla dht``) also ``corolla.ping``, which new servers time to measure their
        bandwidth."""
        await p2p.add_protobuf_handler(RPC_DIAL_BACK, self.rpc_dial_back, runtime_pb2.ExpertRequest)
        if answer_pings:
            await p2p.add_protobuf_handler(RPC_PING, _pong, runtime_pb2.ExpertRequest)

    async def rpc_dial_back(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        try:
            asked = DialBackRequest.model_validate_json(request.metadata)
        except Exception:
            raise ValueError("malformed dial-back request") from None
        started = time.monotonic()
        reachable = await self._dial(context.remote_id, asked.addrs)
        reply = DialBackReply(reachable=reachable, seconds=time.monotonic() - started)
        return runtime_pb2.ExpertResponse(metadata=reply.model_dump_json().encode())

    async def _dial(self, peer_id: PeerID, addrs: Sequence[str]) -> bool:
        try:
            maddrs = [daemon_maddr(a) for a in addrs]
        except Exception:  # a malformed address: nothing to dial
            return False
        async with self._lock:  # one dial at a time: each on a fresh connection
            probe = await self._get_probe()
            try:
                await asyncio.wait_for(probe._client.connect(peer_id, maddrs), DIAL_TIMEOUT)
                return True
            except Exception as e:
                logger.debug("dial-back to ...%s failed: %s", peer_id.to_base58()[-8:], e)
                return False
            finally:
                with contextlib.suppress(Exception):
                    await probe._client.disconnect(peer_id)
                self._last_used = time.monotonic()

    async def _get_probe(self) -> P2P:
        if self._probe is None:
            # listens nowhere, joins nothing: its only connections are the dials it makes
            self._probe = await P2P.create(
                host_maddrs=None, no_listen=True, dht_mode="client", use_relay=True, auto_nat=False,
                nat_port_map=False, startup_timeout=30,
            )  # fmt: skip
            if self._reaper is None:
                self._reaper = asyncio.create_task(self._reap())
        return self._probe

    async def _reap(self) -> None:
        """Shut the probe daemon down once it has been idle for ``PROBE_IDLE`` seconds."""
        while True:
            await asyncio.sleep(PROBE_IDLE / 4)
            async with self._lock:
                if self._probe is not None and time.monotonic() - self._last_used > PROBE_IDLE:
                    probe, self._probe = self._probe, None
                    with contextlib.suppress(Exception):
                        await probe.shutdown()

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._probe is not None:
            with contextlib.suppress(Exception):
                await self._probe.shutdown()
            self._probe = None


async def _pong(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse()


async def ask_dial_back(
    p2p: P2P, helper: PeerID, addrs: Sequence[str], timeout: float = ASK_TIMEOUT
) -> bool | None:
    """Ask ``helper`` to dial us at ``addrs``; None when it does not answer."""
    request = runtime_pb2.ExpertRequest(
        metadata=DialBackRequest(addrs=tuple(addrs)[:MAX_ADDRS]).model_dump_json().encode()
    )
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(helper, RPC_DIAL_BACK, request, runtime_pb2.ExpertResponse), timeout
        )
        return DialBackReply.model_validate_json(response.metadata).reachable
    except Exception as e:  # an old peer without the handler, unreachable, timed out
        logger.debug("dial-back request to ...%s failed: %s", helper.to_base58()[-8:], e)
        return None


async def check_direct(
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
) -> Reachability:
    """Whether peers can dial a peer listening on ``host_maddrs`` (announcing ``announce_maddrs``):
    a temporary P2P daemon there asks up to ``MAX_HELPERS`` of ``initial_peers`` to dial it back."""
    helpers = list(dict.fromkeys(p for p in (peer_of(m) for m in initial_peers) if p))[:MAX_HELPERS]
    if not helpers:
        return verdict([])
    p2p = await P2P.create(
        initial_peers=list(initial_peers), host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None, dht_mode="client", use_relay=False,
        auto_nat=False, nat_port_map=False, startup_timeout=30,
    )  # fmt: skip
    try:
        addrs = [str(m).rsplit("/p2p/", 1)[0] for m in await p2p.get_visible_maddrs(latest=True)]
        answers = await asyncio.gather(*(ask_dial_back(p2p, PeerID.from_base58(h), addrs) for h in helpers))
    finally:
        await p2p.shutdown()
    return verdict(answers)


async def check_relayed(
    p2p: P2P, relays: Sequence[str], circuits: Sequence[str], *, wait: float = 20.0
) -> bool:
    """Whether a relay can dial us through our ``/p2p-circuit`` addresses; retried for ``wait``
    seconds, as the reservations are made in the background once the daemon starts."""
    helpers = [PeerID.from_base58(p) for p in dict.fromkeys(peer_of(r) for r in relays) if p]
    deadline = time.monotonic() + wait
    while helpers:
        for helper in helpers:
            if await ask_dial_back(p2p, helper, circuits):
                return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(1.0)
    return False


def check_reachability(
    initial_peers: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str], *, skip: bool
) -> Reachability | None:
    """Blocking ``check_direct`` for a peer about to join (None: skipped or no peer to ask)."""
    if skip or not any(peer_of(m) for m in initial_peers):
        return None
    try:
        return asyncio.run(check_direct(initial_peers, host_maddrs, announce_maddrs))
    except Exception as e:  # the probe daemon could not start (a port in use, ...): the real one says why
        logger.debug("reachability check failed: %s", e)
        return verdict([None] * len(initial_peers))


def reachability_message(
    reach: Reachability | None, *, skip: bool, relays: bool, port: str, bootstrap: bool = False
) -> tuple[int, str]:
    """Pure: the log level and the one line a peer logs about its reachability. ``relays``:
    whether it will become reachable through relays when peers cannot dial it; ``port``: the port
    to suggest forwarding; ``bootstrap``: a ``corolla dht`` peer, which others must dial directly."""
    if reach is None:
        if skip:
            return logging.INFO, "reachability check skipped (--skip_reachability_check): serving directly"
        return logging.INFO, "reachability: first peer of the swarm, nobody to ask; serving directly"
    if reach.direct is None:
        return logging.WARNING, (
            f"reachability unknown: none of the {reach.asked} peers asked answered; serving directly"
        )
    if reach.direct:
        return logging.INFO, f"reachable directly: {reach.describe()}"
    fix = (
        f"to serve directly, forward TCP port {port} on your router to this machine and start with "
        f"--port {port} --public_ip YOUR_PUBLIC_IP (or --announce_maddrs)"
    )
    if bootstrap:
        return logging.WARNING, (
            f"not reachable directly ({reach.describe()}): peers outside your network cannot join "
            f"through this bootstrap peer, nor use it as a relay; {fix}"
        )
    if relays:
        return logging.INFO, (
            f"not reachable directly ({reach.describe()}): behind NAT or a firewall, so serving through "
            f"relays on the --initial_peers (clients prefer direct servers); {fix}"
        )
    return logging.WARNING, (
        f"not reachable directly ({reach.describe()}) and relays are off (--no_relay/--no_auto_relay): "
        f"only peers in your own network can reach this one; {fix}"
    )
