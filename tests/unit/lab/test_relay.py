"""The delaying relay in front of a plain asyncio echo server (the relay runs in its own thread)."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from corolla.lab.relay import DelayRelay, free_port, loopback_host

DELAY = 0.05


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def echo_behind_relay(delay_s: float, **kwargs: float) -> AsyncIterator[tuple[DelayRelay, int]]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    relay = DelayRelay("127.0.0.1", server.sockets[0].getsockname()[1], delay_s=delay_s, **kwargs)  # type: ignore[arg-type]
    port = relay.start()
    try:
        yield relay, port
    finally:
        relay.stop()
        server.close()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes) -> float:
    started = time.perf_counter()
    writer.write(message)
    await writer.drain()
    assert await reader.readexactly(len(message)) == message
    return time.perf_counter() - started


def test_round_trip_costs_two_delays() -> None:
    async def test() -> None:
        async with echo_behind_relay(DELAY) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            rtts = [await _round_trip(reader, writer, b"ping %d" % i) for i in range(5)]
            writer.close()
        assert min(rtts) >= 2 * DELAY * 0.95
        assert statistics.median(rtts) < 2 * DELAY + 0.1

    run(test)


def test_no_delay_is_plain_forwarding() -> None:
    async def test() -> None:
        async with echo_behind_relay(0.0) as (relay, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await _round_trip(reader, writer, b"hello") < 2 * DELAY
            writer.close()
            assert relay.accepted == 1

    run(test)


def test_large_payload_arrives_intact_and_is_not_serialised_by_the_delay() -> None:
    payload = os.urandom(8 << 20)  # >= 128 chunks: a sleep per chunk would take >= 2 * 128 * delay

    async def test() -> None:
        delay = 0.02
        async with echo_behind_relay(delay) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.perf_counter()
            writer.write(payload)
            writer.write_eof()  # half-close: the echo still comes back
            received = await reader.read()
            elapsed = time.perf_counter() - started
            writer.close()
        assert received == payload
        assert elapsed >= 2 * delay * 0.95
        assert elapsed < 2 * 128 * delay / 2

    run(test)


def test_order_is_kept_across_many_writes_and_a_delay_change() -> None:
    messages = [b"%06d;" % i for i in range(2000)]

    async def test() -> None:
        async with echo_behind_relay(DELAY) as (relay, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for i, message in enumerate(messages):
                writer.write(message)
                await writer.drain()
                if i == len(messages) // 2:
                    relay.delay_s = 0.0  # later chunks are due earlier, yet must not overtake
                    await asyncio.sleep(0.001)
            received = await reader.readexactly(sum(map(len, messages)))
            writer.close()
        assert received == b"".join(messages)

    run(test)


def test_connections_are_independent() -> None:
    async def test() -> None:
        async with echo_behind_relay(DELAY) as (relay, port):
            pairs = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            started = time.perf_counter()
            rtts = await asyncio.gather(
                *(_round_trip(r, w, b"conn %d" % i) for i, (r, w) in enumerate(pairs))
            )
            elapsed = time.perf_counter() - started
            for _, writer in pairs:
                writer.close()
            assert relay.accepted == 4
        assert min(rtts) >= 2 * DELAY * 0.95
        assert elapsed < 4 * 2 * DELAY  # in parallel, not one after another

    run(test)


def test_drop_resets_the_connection() -> None:
    async def test() -> None:
        async with echo_behind_relay(DELAY, drop=1.0) as (relay, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"lost")
            with pytest.raises(ConnectionResetError):
                await reader.read(10)
            assert relay.resets == 1
            await asyncio.sleep(0.05)
            assert relay.open_connections == 0

    run(test)


def test_partial_drop_resets_some_connections_only() -> None:
    async def attempt(port: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await _round_trip(reader, writer, b"x")
            return True
        except (ConnectionResetError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()

    async def test() -> None:
        async with echo_behind_relay(0.0, drop=0.5, seed=1) as (relay, port):
            survived = [await attempt(port) for _ in range(40)]
        assert 0 < sum(survived) < len(survived)
        assert relay.resets == survived.count(False)

    run(test)


def test_reset_all_and_stop_reset_open_connections() -> None:
    async def test() -> None:
        async with echo_behind_relay(DELAY) as (relay, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _round_trip(reader, writer, b"alive")
            assert await asyncio.to_thread(relay.reset_all) == 1
            with pytest.raises(ConnectionResetError):
                await reader.read(10)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # new connections still work
            await _round_trip(reader, writer, b"again")
            await asyncio.to_thread(relay.stop)
            with pytest.raises(ConnectionResetError):
                await reader.read(10)
            await asyncio.to_thread(relay.stop)  # idempotent

    run(test)


def test_unreachable_target_resets_the_dialer() -> None:
    async def test() -> None:
        with socket.socket() as closed:  # bound, not listening: refused, and no one else can take it
            closed.bind(("127.0.0.1", 0))
            # the reset may arrive while connecting (a busy machine) or on the first read
            with (
                DelayRelay("127.0.0.1", closed.getsockname()[1], delay_s=0.0) as relay,
                pytest.raises(ConnectionResetError),
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
                try:
                    await reader.read(10)
                finally:
                    writer.close()

    run(test)


def test_free_port_is_bindable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


@pytest.mark.parametrize("host", ["10.0.0.1", "192.168.1.1", "8.8.8.8", "0.0.0.0", "::", "example.com", ""])
def test_non_loopback_targets_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        DelayRelay(host, 80, delay_s=0.01)
    with pytest.raises(ValueError, match="loopback"):
        DelayRelay("127.0.0.1", 80, delay_s=0.01, listen_host=host)


def test_loopback_hosts_are_accepted() -> None:
    assert loopback_host("127.0.0.1") == "127.0.0.1"
    assert loopback_host("127.3.2.1") == "127.3.2.1"
    assert loopback_host("::1") == "::1"
    assert loopback_host("localhost") == "127.0.0.1"


@pytest.mark.parametrize(
    "kwargs", [{"delay_s": -0.1}, {"delay_s": 0.1, "drop": 1.5}, {"delay_s": 0.1, "drop": -0.1}]
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DelayRelay("127.0.0.1", 80, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_port"):
        DelayRelay("127.0.0.1", 0, delay_s=0.1)


def test_maddr_names_the_listening_port() -> None:
    with DelayRelay("127.0.0.1", 9, delay_s=0.0) as relay:
        assert relay.maddr == f"/ip4/127.0.0.1/tcp/{relay.port}"
    with (
        DelayRelay("127.0.0.1", 9, delay_s=0.0) as relay,
        pytest.raises(RuntimeError, match="already running"),
    ):
        relay.start()
