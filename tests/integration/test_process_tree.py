"""Nothing outlives a command: SIGKILL of ``corolla serve``, ``corolla api`` or ``corolla generate``
takes their DHT process and ``p2pd`` with it, and Ctrl-C stops a server cleanly and quickly.

Each command runs as a terminal would run it: in a process group of its own, so "Ctrl-C" is SIGINT
to that group. What it left is read from the process table (``psutil``): its descendants and the
ports they listened on, before and after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from helpers.models import save_tiny_chat_llama

NUM_BLOCKS = 2
GONE_WITHIN = 5.0  # seconds: how long a killed command's processes may take to follow it
CTRL_C_WITHIN = 5.0


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_llama(
        tmp_path_factory.mktemp("tiny_chat"), num_hidden_layers=NUM_BLOCKS, max_position_embeddings=1024
    )


@pytest.fixture(scope="module")
def swarm(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    servers = start_swarm(str(chat_model), [(0, NUM_BLOCKS)], log_dir=tmp_path_factory.mktemp("tree"))
    yield servers[0]
    stop_all(servers)


class Command:
    """A ``corolla`` command in a process group of its own, its output collected in the background."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "corolla.cli.main", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=_collect, args=(stream, lines), daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 180.0, *, stdout_only: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, "".join(self.stdout if stdout_only else self.stdout + self.stderr)):
            assert self.process.poll() is None, f"exited {self.process.returncode}:\n{''.join(self.stderr)}"
            assert time.monotonic() < deadline, f"no {pattern!r} after {timeout} s:\n{''.join(self.stderr)}"
            time.sleep(0.01)

    def tree(self) -> list[psutil.Process]:
        """This command's process and every descendant (the DHT process, p2pd, ...)."""
        me = psutil.Process(self.process.pid)
        return [me, *me.children(recursive=True)]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def _collect(stream, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        lines.append(line)


def listening_ports(processes: list[psutil.Process]) -> set[int]:
    ports = set()
    for process in processes:
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                ports.add(conn.laddr.port)
    return ports


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in processes if running(p)]


def assert_all_gone(processes: list[psutil.Process], ports: set[int], what: str) -> None:
    """Every process exits and no port is listened on any more, within ``GONE_WITHIN``."""
    deadline = time.monotonic() + GONE_WITHIN
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in alive(processes)]
    assert not left, f"{what}: still running {GONE_WITHIN} s later: {left}"
    listening = {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert not ports & listening, f"{what}: ports still listened on: {sorted(ports & listening)}"


def sigkill_once_ready(args: list[str], ready: str, *, stdout_only: bool = False) -> None:
    """Start ``corolla ARGS``; once ``ready`` shows, SIGKILL the command alone (as the OOM killer
    would) and check that its whole process tree and the ports it listened on are gone."""
    what = f"corolla {args[0]}"
    command = Command(*args)
    try:
        command.wait_for(ready, stdout_only=stdout_only)
        processes = command.tree()
        names = [p.name() for p in processes]
        expected = f"{what}: expected the command, its DHT and p2pd: {names}"
        assert "p2pd" in names and len(processes) >= 3, expected
        ports = listening_ports(processes)
        os.kill(command.process.pid, signal.SIGKILL)
        command.process.wait(10)
        assert_all_gone(processes, ports, what)
    finally:
        command.stop()


def test_sigkill_of_a_server_leaves_nothing_running(chat_model: Path, swarm: LocalServer) -> None:
    args = ["serve", str(chat_model), "--initial_peers", swarm.maddr or "", "--block_indices", "0:1"]
    sigkill_once_ready(args, r"Join this swarm")


def test_sigkill_of_the_api_leaves_nothing_running(chat_model: Path, swarm: LocalServer) -> None:
    sigkill_once_ready(["api", str(chat_model), "--initial_peers", swarm.maddr or "", "--port", "0"],
                       r": serving .* at http")  # fmt: skip


def test_sigkill_of_generate_mid_answer_leaves_nothing_running(chat_model: Path, swarm: LocalServer) -> None:
    args = ["generate", str(chat_model), "--initial_peers", swarm.maddr or "", "Tell me a long story.",
            "--max_new_tokens", "900"]  # fmt: skip
    sigkill_once_ready(args, r"\S", stdout_only=True)  # the answer has begun streaming


def test_ctrl_c_stops_a_server_cleanly_within_5_seconds(chat_model: Path, swarm: LocalServer) -> None:
    server = Command("serve", str(chat_model), "--initial_peers", swarm.maddr or "", "--block_indices", "1:2")
    try:
        server.wait_for(r"Join this swarm")
        processes = server.tree()
        ports = listening_ports(processes)
        logged = len(server.stderr)
        t0 = time.monotonic()
        os.killpg(server.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        server.process.wait(30)
        took = time.monotonic() - t0
        assert took < CTRL_C_WITHIN, f"took {took:.1f} s"
        assert_all_gone(processes, ports, "corolla serve after Ctrl-C")
        after = "".join(server.stderr[logged:])
        assert "received SIGINT" in after and "server stopped" in after, after
        assert not re.search(r"\b(WARN|WARNING|ERROR|Traceback)\b", after), after
    finally:
        server.stop()


def test_a_second_ctrl_c_exits_at_once(chat_model: Path, swarm: LocalServer) -> None:
    server = Command("serve", str(chat_model), "--initial_peers", swarm.maddr or "", "--block_indices", "1:2")
    try:
        server.wait_for(r"Join this swarm")
        processes = server.tree()
        os.killpg(server.process.pid, signal.SIGINT)
        server.wait_for(r"received SIGINT")  # shutting down: it lets requests end for 0.2 s at least
        os.killpg(server.process.pid, signal.SIGINT)
        assert server.process.wait(30) == 130
        assert_all_gone(processes, set(), "corolla serve after two Ctrl-Cs")
        assert "exiting at once" in "".join(server.stderr)
    finally:
        server.stop()
