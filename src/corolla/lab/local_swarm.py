"""Start real ``corolla serve`` processes on this machine and wait until they are ready.

Used by ``corolla demo``, the benchmarks and the integration tests: each server is a
separate process on loopback, exactly as a volunteer would run it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from corolla.errors import CorollaError

JOIN_LINE = re.compile(r"--initial_peers (/\S+)")
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class LocalServer:
    """One ``python -m corolla.cli.run_server`` (or ``run_dht``) process; its log goes to a file.

    Ready once it prints its join line (``--initial_peers MADDR``) on stdout."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        name: str = "server",
        module: str = "corolla.cli.run_server",
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix``: a command to run the process through (a network lab's ``ip netns exec NS``)."""
        self.args = list(args)
        # without a log_dir, a temporary one that stop() removes: nothing is left behind
        self._temp_log_dir = None if log_dir else Path(tempfile.mkdtemp(prefix="corolla-logs-"))
        log_dir = log_dir or self._temp_log_dir
        assert log_dir is not None
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115  (closed in stop())
        self.maddr: str | None = None
        self._ready = threading.Event()
        self.started_at = time.monotonic()
        self.ready_after: float | None = None
        cmd = [*prefix, sys.executable, "-m", module, *self.args]
        self.process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._watch_stdout, daemon=True).start()

    def _watch_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            match = JOIN_LINE.search(line)
            if match and not self._ready.is_set():
                self.maddr = match.group(1)
                self.ready_after = time.monotonic() - self.started_at
                self._ready.set()

    def wait_ready(self, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                why = "exited" if self.process.poll() is not None else f"was not ready after {timeout:.0f} s"
                raise CorollaError(f"server {' '.join(self.args)} {why}; log:\n{self.log_tail()}")
        assert self.maddr is not None
        return self.maddr

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def stop(self, timeout: float = 10.0) -> int | None:
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait(5)
        self._log.close()
        if self._temp_log_dir is not None:
            shutil.rmtree(self._temp_log_dir, ignore_errors=True)
        return self.process.returncode


def fresh_log_dir(cache_dir: str | Path, name: str) -> Path:
    """``<cache_dir>/logs/<name>``, emptied: where a command that starts servers (the demo, a
    benchmark) keeps their logs, one file per server, until its next run."""
    path = Path(cache_dir) / "logs" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shared_cores_args(servers: int) -> list[str]:
    """``--num_threads`` for each of ``servers`` servers sharing this machine: its cores split
    between them. Each server computing with every core makes them preempt each other's threads,
    which wait on one another at every operation; measured on 2 cores with the built-in model split
    over two servers: 19.0 tok/s with 2 threads each, 21.9 with 1 each."""
    return ["--num_threads", str(max(1, usable_cores() // max(1, servers)))]


def server_args(model: str, span: tuple[int, int], host_maddr: str, initial_peers: Sequence[str],
                extra_args: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """``corolla serve`` arguments for one server on ``span``: it joins ``initial_peers`` or, with
    none, starts a new swarm."""
    swarm = ["--initial_peers", *initial_peers] if initial_peers else ["--new_swarm"]
    return [
        model,
        "--block_indices",
        f"{span[0]}:{span[1]}",
        "--host_maddrs",
        host_maddr,
        *swarm,
        *extra_args,
    ]


def start_swarm(
    model: str,
    splits: Sequence[tuple[int, int]],
    *,
    extra_args: Sequence[str] = (),
    initial_peers: Sequence[str] = (),
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> list[LocalServer]:
    """Start one server per ``(start, end)`` span on loopback: the first one (unless
    ``initial_peers`` is given) starts a new swarm, the others join it; all start together."""
    servers: list[LocalServer] = []
    try:
        peers = list(initial_peers)
        for i, (start, end) in enumerate(splits):
            args = server_args(model, (start, end), LOOPBACK, peers, extra_args)
            servers.append(LocalServer(args, env=env, log_dir=log_dir, name=f"server{i}-{start}-{end}"))
            if not peers:
                peers = [servers[0].wait_ready()]
        for server in servers:
            server.wait_ready()
    except BaseException:
        stop_all(servers)
        raise
    return servers


def start_dht_peer(*, log_dir: Path | None = None) -> LocalServer:
    """A bootstrap-only DHT peer on loopback (``corolla dht``), ready to be joined."""
    peer = LocalServer(["--host_maddrs", LOOPBACK], log_dir=log_dir, name="dht", module="corolla.cli.run_dht")
    peer.wait_ready()
    return peer


def stop_all(servers: Sequence[LocalServer]) -> None:
    """SIGTERM every server at once, then wait for each (shutdowns overlap)."""
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop()
