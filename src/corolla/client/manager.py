"""The client's view of the swarm: records from the DHT turned into routes."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import time

from hivemind import DHT
from hivemind.p2p import P2P, PeerID

from corolla.client.bans import BanList
from corolla.client.routing import Hop, latency_route, throughput_route
from corolla.client.threads import any_local, local_ips
from corolla.client.transport import STREAM_LOST, EventLoopThread, measure_rtt
from corolla.client.verify import VerificationReport
from corolla.config import ClientConfig, NetworkConfig
from corolla.errors import MissingBlocks, ServerUnavailable
from corolla.swarm.auth import bind_swarm_key, load_swarm_key
from corolla.swarm.dht import DIAL_TIMEOUT, add_record_validators, dial_announced, rejoin, start_dht
from corolla.swarm.registry import fetch_block_records, foreign_records_hint
from corolla.swarm.spans import ServerSpan, missing_blocks, spans_from_records

logger = logging.getLogger(__name__)

RTT_TTL = 60.0  # seconds before a server's round-trip time is measured again
REJOIN_EVERY = 5.0  # seconds between attempts to rejoin the swarm while blocks are missing
MAX_SEEN = 32  # servers remembered to rejoin through
RESET_GRACE = 60.0  # seconds: a server whose connection was reset is retried unbanned once per this


def _connection_reset(error: BaseException) -> bool:
    """Whether ``error`` says the connection (or its stream) was reset or lost, rather than the
    server failing."""
    text = f"{type(error).__name__}: {error}"
    return isinstance(error, ConnectionResetError) or any(
        marker in text for marker in ("ConnectionResetError", "stream reset", "Connection reset", STREAM_LOST)
    )


class SequenceManager:
    """Finds servers for a model's blocks; owns the client's DHT peer and P2P handle."""

    def __init__(
        self,
        config: ClientConfig,
        dht_prefix: str,
        num_blocks: int,
        dht: DHT | None = None,
        *,
        adapter: str | None = None,
    ) -> None:
        self.config, self.dht_prefix, self.num_blocks = config, dht_prefix, num_blocks
        self.adapter = adapter  # route only to servers that announce this LoRA adapter
        self._own_dht = dht is None
        self.swarm_key = load_swarm_key(config.swarm_key)  # closed swarms: None for an open one
        self._foreign_hint: str | None = None  # why the swarm may look empty (another swarm's records)
        if dht is not None:
            add_record_validators(dht, self.swarm_key)
        network = NetworkConfig(
            initial_peers=config.initial_peers, swarm_key=config.swarm_key, identity_path=config.identity_path
        )
        self.dht = dht or start_dht(network, client_mode=True)
        self.loop = EventLoopThread.get()
        self.p2p: P2P = self.loop.run(self.dht.replicate_p2p(), timeout=30)
        bind_swarm_key(self.p2p, self.swarm_key)  # our RPCs carry proofs of the swarm key
        self.bans = BanList(config.ban_timeout)
        # forward passes' verification (inference sessions keep their own): checks, liars excluded
        self.verification = VerificationReport(config.verify_fraction, config.verify_seed)
        self._rtt: dict[str, tuple[float, float]] = {}  # peer -> (seconds, measured at)
        self._dialed: dict[str, float] = {}  # peer -> when we last dialed its announced addresses
        self._spans: list[ServerSpan] = []
        self._server_here = False
        self._seen: dict[str, tuple[str, ...]] = {}  # servers seen, and their addresses: to rejoin through
        self._rejoined = -REJOIN_EVERY
        self._resets: dict[str, float] = {}  # peer -> when a reset connection last spared it a ban
        self._updated = 0.0
        self._stop = threading.Event()
        atexit.register(self.shutdown)
        threading.Thread(target=self._refresh_forever, name="corolla-swarm-view", daemon=True).start()

    def _refresh_forever(self) -> None:
        """Keep the swarm view (records and round-trip times) fresh in the background, so routing
        rarely waits for the DHT; failures are retried next period."""
        while not self._stop.wait(self.config.update_period):
            try:
                self.rtts(self.spans(refresh=True))
            except Exception as e:
                logger.debug("background refresh of the swarm view failed: %s", e)

    def spans(self, *, refresh: bool = False) -> list[ServerSpan]:
        if refresh or time.monotonic() - self._updated > self.config.update_period:
            records = fetch_block_records(self.dht, self.dht_prefix, self.num_blocks)
            self._foreign_hint = foreign_records_hint(records, keyed=self.swarm_key is not None)
            self._spans = spans_from_records(records)
            self._updated = time.monotonic()
            self._seen.update((s.peer_id, s.info.addrs) for s in self._spans if s.info.addrs)
            if missing_blocks(self._spans, self.num_blocks):
                self._rejoin()
            self._dial(self._spans)
            self._server_here = any_local((s.info.addrs for s in self._spans), local_ips())
        return self._spans

    @property
    def server_here(self) -> bool:
        """Whether a server of this swarm runs on this machine (``client/threads.py``), by the swarm
        view: fetched now if it never was (the first route would fetch it anyway)."""
        if not self._updated:
            self.spans()
        return self._server_here

    def _rejoin(self) -> None:
        """Blocks are missing: perhaps the swarm lost us (our bootstrap peers restarted). Ping the
        initial peers and the servers seen before back into the DHT, at most every ``REJOIN_EVERY``."""
        now = time.monotonic()
        if now - self._rejoined < REJOIN_EVERY:
            return
        self._rejoined = now
        seen = dict(list(self._seen.items())[-MAX_SEEN:])
        try:
            answered = rejoin(self.dht, self.config.initial_peers, seen)
        except Exception as e:
            logger.debug("rejoining the swarm failed: %s", e)
            return
        if answered:
            logger.debug("rejoined the swarm: %d peers answered", answered)

    def _dial(self, spans: list[ServerSpan]) -> None:
        """Dial servers at the addresses their records announce (again after ``RTT_TTL``, when the
        P2P daemon may have dropped an idle connection and its addresses), so that calls reach them
        even where the daemon's own routing does not find them."""
        now = time.monotonic()
        due = {
            s.peer_id: s.info.addrs
            for s in spans
            if s.info.addrs and now - self._dialed.get(s.peer_id, -RTT_TTL) >= RTT_TTL
        }
        if not due:
            return
        self._dialed.update(dict.fromkeys(due, now))

        async def dial_all() -> None:
            dials = (dial_announced(self.p2p, PeerID.from_base58(peer), addrs) for peer, addrs in due.items())
            await asyncio.gather(*dials)

        with contextlib.suppress(Exception):
            self.loop.run(dial_all(), timeout=DIAL_TIMEOUT + 1)

    def failed(self, hop: Hop, error: Exception, failures: int) -> str:
        """Ban a server that failed; returns a one-line account for logs and errors. After more
        than ``max_retries`` failures of one request, gives up with ``ServerUnavailable``."""
        now = time.monotonic()
        if _connection_reset(error) and now - self._resets.get(hop.peer_id, -RESET_GRACE) >= RESET_GRACE:
            # a connection, not the server, went away: a relayed one replaced by a direct one (hole
            # punching), a relay restarting. The same server is tried again once, unbanned
            self._resets[hop.peer_id] = now
            seconds = 0.0
        else:
            seconds = self.bans.ban(hop.peer_id)
        account = (
            f"server ...{hop.peer_id[-8:]} failed on blocks {hop.start}:{hop.end} ({error}); "
            + (f"banned for {seconds:.0f} s" if seconds else "trying it again on a new stream")
        )
        if failures > self.config.max_retries:
            raise ServerUnavailable(f"giving up after {failures} failed servers; last: {account}") from error
        logger.warning("%s; retrying on other servers", account)
        return account

    def rtts(self, spans: list[ServerSpan]) -> dict[str, float]:
        """Round-trip times to these servers, measured (in parallel) when unknown or older than
        ``RTT_TTL``; a server that does not answer gets ``inf``."""
        now = time.monotonic()
        stale = sorted(
            {s.peer_id for s in spans if now - self._rtt.get(s.peer_id, (0.0, -RTT_TTL))[1] >= RTT_TTL}
        )
        if stale:

            async def measure_all() -> list[float]:
                return await asyncio.gather(*(measure_rtt(self.p2p, PeerID.from_base58(p)) for p in stale))

            for peer, rtt in zip(stale, self.loop.run(measure_all(), timeout=10), strict=True):
                self._rtt[peer] = (rtt, now)
        return {peer: rtt for peer, (rtt, _) in self._rtt.items()}

    def _make_route(self, spans: list[ServerSpan], start: int, end: int, banned: frozenset[str],
                    mode: str) -> list[Hop] | None:  # fmt: skip
        if mode == "latency":
            usable = [s for s in spans if s.peer_id not in banned]
            return latency_route(spans, start, end, rtt=self.rtts(usable), banned=banned)
        return throughput_route(spans, start, end, banned=banned)

    def route(
        self, start: int = 0, end: int | None = None, *, cause: str | None = None, mode: str = "latency",
        exclude: frozenset[str] = frozenset(),
    ) -> list[Hop]:
        """A chain of ONLINE, unbanned servers for blocks ``start..end-1``: with the least expected
        latency per step (``mode="latency"``, for inference) or the most throughput (``"throughput"``,
        for long forward passes). Waits a bounded time for missing blocks, then raises
        ``MissingBlocks`` (with ``cause``: what failed before). ``exclude``: peers never to use
        (those that failed verification)."""
        end = self.num_blocks if end is None else end
        deadline = time.monotonic() + self.config.max_wait_for_blocks
        refresh = cause is not None  # a failure: the view may be stale
        while True:
            spans = self.spans(refresh=refresh)
            if self.adapter is not None:
                spans = [s for s in spans if self.adapter in s.info.adapters]
            banned = self.bans.banned() | exclude
            route = self._make_route(spans, start, end, banned, mode)
            if route is not None:
                logger.debug("route: %s", " -> ".join(f"{h.peer_id[-6:]}[{h.start}:{h.end}]" for h in route))
                return route
            if time.monotonic() >= deadline:
                usable = [s for s in spans if s.peer_id not in banned]
                missing = [i for i in missing_blocks(usable, self.num_blocks) if start <= i < end]
                if self.adapter is not None and cause is None:
                    cause = f"no server of these blocks announces the adapter {self.adapter!r}"
                cause = cause or self._foreign_hint
                raise MissingBlocks(missing, waited=self.config.max_wait_for_blocks, cause=cause)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            refresh = True

    def addrs_of(self, peer_id: str) -> tuple[str, ...]:
        """Where a server's record says it can be dialed (empty if it is not in the swarm view)."""
        return next((s.info.addrs for s in self._spans if s.peer_id == peer_id), ())[:16]

    @staticmethod
    def peer(hop: Hop) -> PeerID:
        return PeerID.from_base58(hop.peer_id)

    def shutdown(self) -> None:
        """Close the P2P handle (and the DHT peer, if this manager started it); idempotent."""
        atexit.unregister(self.shutdown)
        self._stop.set()
        with contextlib.suppress(Exception):
            self.loop.run(self.p2p.shutdown(), timeout=5)
        if self._own_dht:
            self.dht.shutdown()
