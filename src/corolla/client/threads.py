"""A client sharing its machine with a server: keep this process's idle threads from spinning.

PyTorch's OpenMP workers spin-wait after each operation (libgomp's default: 300,000 spins) before
they sleep. A client whose workers spin while a server on the same cores computes takes CPU time
from it at every step, and a busy machine makes both collapse. corolla's own commands start with
``GOMP_SPINCOUNT=10000`` (``corolla.cli``). A Python process is the user's: the library does not
change its settings, but where a server it found runs on this machine and nothing in the
environment chose the spinning, ``generate`` computes the client's own layers on one thread while
it runs (no worker is woken, so none spins) and gives the thread count back when it returns. It
says so once, with what keeps every thread instead."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Set

import torch

logger = logging.getLogger(__name__)

SPIN_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
SUGGESTED_SPINCOUNT = "10000"
_IP = re.compile(r"^/ip[46]/([^/]+)/")
_said = False


def is_local(addrs: Iterable[str], local_ips: Set[str]) -> bool:
    """Whether a server announcing ``addrs`` runs on this machine: each of its IP addresses is one
    of ours (loopback included); a record without IP addresses tells nothing."""
    ips = [m.group(1) for m in map(_IP.match, addrs) if m]
    return bool(ips) and all(ip in local_ips for ip in ips)


def any_local(servers_addrs: Iterable[Iterable[str]], local_ips: Set[str]) -> bool:
    """Whether any of these servers runs on this machine (``is_local``)."""
    return any(is_local(addrs, local_ips) for addrs in servers_addrs)


def generate_threads(server_here: bool, env: Mapping[str, str], threads: int) -> int | None:
    """The thread count ``generate`` computes this process's layers with: 1 where a server shares
    this machine and this process's OpenMP workers would spin by default; ``None``: left as it is
    (no server here, no workers to spin, or the environment chose how they wait)."""
    if not server_here or threads <= 1 or any(name in env for name in SPIN_VARIABLES):
        return None
    return 1


def shared_cores_note(threads: int) -> str:
    """What the client says, once, when it computes on one thread (``generate_threads``)."""
    return (
        "a corolla server runs on this machine and shares its cores with this process: generate() "
        f"computes this process's own layers on 1 thread instead of {threads} while it runs (given back "
        "after), since idle PyTorch threads here would spin while the server computes; to keep every "
        f"thread without the spinning, start Python with GOMP_SPINCOUNT={SUGGESTED_SPINCOUNT} in the "
        "environment (as corolla's own commands do)"
    )


@contextlib.contextmanager
def while_generating(server_here: bool) -> Iterator[None]:
    """Run a ``generate`` call with ``generate_threads``' count in this thread, then restore it."""
    threads = torch.get_num_threads()
    count = generate_threads(server_here, os.environ, threads)
    if count is None:
        yield
        return
    global _said
    if not _said:
        _said = True
        logger.warning(shared_cores_note(threads))
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def local_ips() -> frozenset[str]:
    """This machine's IP addresses (loopback included), read once per process."""
    import psutil

    ips = {"127.0.0.1", "::1"}
    for addresses in psutil.net_if_addrs().values():
        ips.update(a.address.split("%")[0] for a in addresses if a.family.name in ("AF_INET", "AF_INET6"))
    return frozenset(ips)
