"""A delaying TCP relay on loopback: internet-like latency and loss on one machine.

This kernel has no ``netem``, so tests and benchmarks put a ``DelayRelay`` in front of a server and
let the server announce the relay's address (``--announce_maddrs``): every peer then reaches the
server through the delay. ``start_delayed_server`` does both.

Each direction of a connection is a FIFO of ``(due time, chunk)``: a reader task stamps every
chunk ``now + delay_s`` as it arrives and a writer task delivers it when due. Order is kept, a
round trip costs ``2 * delay_s``, and throughput is not limited by the delay (many chunks are in
flight at once). The TCP handshake itself is not delayed (the relay accepts at once), so opening a
connection costs no round trip; everything sent on it does. The relay only talks to loopback
addresses; anything else is a ``ValueError``.

A libp2p connection is used both ways, so a relay delays the traffic of connections *dialed to* its
server: peers that find the server through the swarm dial the announced relay, but a connection the
server itself dialed (e.g. to a server that started earlier) carries the other peer's delay instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from corolla.lab.local_swarm import LocalServer, server_args

T = TypeVar("T")
CHUNK_BYTES = 64 * 1024
QUEUE_CHUNKS = 1024  # per direction: at most 64 MiB in flight before the reader waits
_RESET = None  # queue marker: the source reset its connection (or dropped it)


class _Reset(Exception):
    """A connection was reset (by an end, or by the relay's ``drop``)."""


def loopback_host(host: str) -> str:
    """``host`` if it is a loopback IP literal (``localhost`` -> ``127.0.0.1``); else ``ValueError``."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the relay only takes loopback IP addresses, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"the relay only connects on loopback; {host} is not a loopback address")
    return host


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN, like a peer whose connection was torn down."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class DelayRelay:
    """Forward every connection on ``listen_host:port`` to ``target_host:target_port``, each chunk
    ``delay_s`` late in each direction. ``drop``: the probability, per chunk, that the relay resets
    the connection (both ends get RST) instead of delivering the chunk; ``seed`` makes it repeatable.

    Runs in its own thread with its own event loop: ``start() -> port``, ``stop()``, or ``with``.
    ``delay_s`` and ``drop`` may be changed while it runs (they apply to chunks read afterwards)."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay_s: float,
        drop: float = 0.0,
        listen_host: str = "127.0.0.1",
        seed: int | None = None,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        if not 0.0 <= drop <= 1.0:
            raise ValueError(f"drop must be a probability in [0, 1], got {drop}")
        if not 0 < target_port < 65536:
            raise ValueError(f"target_port must be between 1 and 65535, got {target_port}")
        self.target = (loopback_host(target_host), target_port)
        self.listen_host = loopback_host(listen_host)
        self.delay_s, self.drop = delay_s, drop
        self.port: int | None = None
        self.accepted = 0  # connections accepted so far
        self.resets = 0  # resets caused by ``drop`` or ``reset_all``
        self._random = random.Random(seed)
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def maddr(self) -> str:
        """The relay's multiaddr, for ``--announce_maddrs``."""
        assert self.port is not None, "start() the relay first"
        family = "ip6" if ":" in self.listen_host else "ip4"
        return f"/{family}/{self.listen_host}/tcp/{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def start(self) -> int:
        """Listen on a free port (returned) and serve from a background thread."""
        if self._loop is not None:
            raise RuntimeError("the relay is already running")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-relay", daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self.port

    def stop(self) -> None:
        """Close the listener and reset every open connection; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        self._loop = self._thread = None

    def reset_all(self) -> int:
        """Reset every open connection now (both ends get RST); returns how many there were."""
        return self._call(self._reset_all())

    def __enter__(self) -> DelayRelay:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- inside the relay's loop ---------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        links = list(self._links)
        await self._reset_all(count=False)
        pipes = [task for link in links for task in link.tasks]
        if pipes:
            await asyncio.wait(pipes, timeout=1.0)  # let them finish before the loop stops

    async def _reset_all(self, *, count: bool = True) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        if count:
            self.resets += len(links)
        return len(links)

    def _should_drop(self) -> bool:
        if self.drop > 0 and self._random.random() < self.drop:
            self.resets += 1
            return True
        return False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            target = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)  # like a refused connection: the dialer sees a reset
            return
        link = _Link(self, (reader, writer), target)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)


class _Link:
    """One relayed connection: two delayed pipes; a reset on either side resets both ends."""

    def __init__(
        self,
        relay: DelayRelay,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.relay = relay
        self.writers = (client[1], target[1])
        self.pipes = (client[0], target[1]), (target[0], client[1])
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        self.tasks = [asyncio.create_task(self._pipe(reader, writer)) for reader, writer in self.pipes]
        try:
            await asyncio.gather(*self.tasks)
        except (_Reset, OSError, asyncio.CancelledError):
            self.reset()
        else:
            for writer in self.writers:
                writer.close()

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            _reset(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(QUEUE_CHUNKS)
        feeder = asyncio.create_task(self._feed(reader, queue))
        try:
            await self._deliver(queue, writer)
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    async def _feed(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes | None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data: bytes | None = await reader.read(CHUNK_BYTES)
            except OSError:
                data = _RESET
            if data and self.relay._should_drop():
                data = _RESET
            await queue.put((loop.time() + self.relay.delay_s, data))
            if not data:  # EOF or reset: nothing more comes from this side
                return

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes | None]], writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if data is _RESET:
                raise _Reset
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()  # half-close: the other direction may still be talking
                return
            writer.write(data)
            await writer.drain()


def start_delayed_server(
    model: str,
    block_indices: tuple[int, int],
    delay_s: float,
    *,
    initial_peers: Sequence[str],
    extra_args: Sequence[str] = (),
    log_dir: Path | None = None,
    drop: float = 0.0,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> tuple[LocalServer, DelayRelay]:
    """Start a server on loopback port P behind a relay on port R (P plus ``delay_s`` each way).

    The server listens on ``/ip4/127.0.0.1/tcp/P`` and announces only ``/ip4/127.0.0.1/tcp/R``, so
    peers that find it through the swarm dial the relay. ``wait``: return once it is ready."""
    port = free_port()
    relay = DelayRelay("127.0.0.1", port, delay_s=delay_s, drop=drop)
    relay.start()
    start, end = block_indices
    announce = ["--announce_maddrs", relay.maddr, *extra_args]
    args = server_args(model, block_indices, f"/ip4/127.0.0.1/tcp/{port}", initial_peers, announce)
    server: LocalServer | None = None
    try:
        name = f"delayed{int(delay_s * 1000)}ms-{start}-{end}-{relay.port}"
        server = LocalServer(args, env=env, log_dir=log_dir, name=name)
        if wait:
            server.wait_ready()
    except BaseException:
        if server is not None:
            server.stop()
        relay.stop()
        raise
    return server, relay
