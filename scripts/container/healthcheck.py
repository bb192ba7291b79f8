#!/usr/bin/env python3
"""The container image's HEALTHCHECK (installed as ``corolla-healthcheck``): exit 0 when healthy.

Healthy means the container's ``corolla`` process (serve, dht or api) answers:

1. if it was given ``--metrics_port N`` (or ``COROLLA_METRICS_PORT=N``), ``GET /metrics`` on
   that port must answer 200 (the server's Python process itself is serving);
2. and at least one TCP port that it or a child (hivemind's P2P daemon, the API's web server)
   listens on must accept a connection.

Everything is found in /proc, so it needs no flag parsing of its own and works whatever port was
chosen (a server without --port listens on a random one). Standard library only; a few seconds
at most. ``--verbose`` prints what it checked.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from pathlib import Path

TIMEOUT = 3.0
LISTEN = "0A"  # TCP state in /proc/net/tcp


def read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def read_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (part.decode(errors="replace").partition("=") for part in raw.split(b"\0") if part)
    return {key: value for key, _, value in pairs}


def all_pids() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def is_corolla(argv: list[str]) -> bool:
    """``corolla CMD …`` (the entrypoint script, run by Python) or ``python -m corolla.cli.…``."""
    if not argv:
        return False
    if os.path.basename(argv[0]) == "corolla":
        return True
    return len(argv) > 1 and (
        os.path.basename(argv[1]) == "corolla"
        or (argv[1] == "-m" and argv[2:3] and argv[2].startswith("corolla"))
    )


def same_root(pid: int) -> bool:
    """Whether ``pid`` sees the same root directory as this check: it runs in this container
    even where the PID namespace is shared (buildah's chroot isolation). False when the process
    cannot be inspected (another user's)."""
    try:
        theirs, ours = os.stat(f"/proc/{pid}/root/"), os.stat("/")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def find_corolla() -> int | None:
    """The oldest corolla process in this container (not this check itself)."""
    for pid in all_pids():
        if pid != os.getpid() and is_corolla(read_cmdline(pid)) and same_root(pid):
            return pid
    return None


def describe(argv: list[str]) -> str:
    """``corolla serve`` / ``corolla dht`` / ``corolla api`` from a process's argv."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "corolla":
            return " ".join(["corolla", *argv[i + 1 : i + 2]])
        if arg == "-m" and i + 1 < len(argv):
            return argv[i + 1]
    return " ".join(argv[:2])


def process_tree(root: int) -> set[int]:
    parents = {pid: parent_of(pid) for pid in all_pids()}
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


def socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def listening_addresses(inodes: set[str]) -> list[tuple[str, int]]:
    """(address to connect to, port) for each listening TCP socket among ``inodes``."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != LISTEN or fields[9] not in inodes:
                continue
            hex_addr, hex_port = fields[1].split(":")
            found.append((connect_address(hex_addr, family), int(hex_port, 16)))
    return found


def connect_address(hex_addr: str, family: int) -> str:
    """The address a local client reaches a socket bound to ``hex_addr`` on (any -> loopback)."""
    raw = bytes.fromhex(hex_addr)
    if family == socket.AF_INET:
        address = socket.inet_ntop(family, raw[::-1])
        return "127.0.0.1" if address == "0.0.0.0" else address
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = socket.inet_ntop(family, words)
    return "::1" if address == "::" else address


def metrics_port(argv: list[str], environ: dict[str, str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg == "--metrics_port" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--metrics_port="):
            return int(arg.partition("=")[2])
    value = environ.get("COROLLA_METRICS_PORT", "").strip()
    return int(value) if value else None


def check() -> tuple[bool, str]:
    pid = find_corolla()
    if pid is None:
        return False, "no corolla process is running"
    argv = read_cmdline(pid)
    port = metrics_port(argv, read_environ(pid))
    if port is not None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
                if response.status != 200:
                    return False, f"/metrics on port {port} answered {response.status}"
        except OSError as error:
            return False, f"/metrics on port {port} does not answer: {error}"
    addresses = listening_addresses(socket_inodes(process_tree(pid)))
    if not addresses:
        return False, f"corolla (pid {pid}) listens on no TCP port yet"
    errors = []
    for address, tcp_port in addresses:
        try:
            with socket.create_connection((address, tcp_port), timeout=TIMEOUT):
                checked = f"metrics on {port} answer, " if port is not None else ""
                return (
                    True,
                    f"{describe(argv)} (pid {pid}): {checked}{address}:{tcp_port} accepts connections",
                )
        except OSError as error:
            errors.append(f"{address}:{tcp_port}: {error}")
    return False, "no listening port accepts connections: " + "; ".join(errors)


def main() -> int:
    try:
        healthy, why = check()
    except Exception as error:  # a health check must answer, never crash with a traceback
        healthy, why = False, f"health check failed: {type(error).__name__}: {error}"
    if "--verbose" in sys.argv or not healthy:
        print(("healthy: " if healthy else "unhealthy: ") + why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
