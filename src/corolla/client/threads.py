"""A client sharing its machine with a server: say what makes both fast (never change it here).

PyTorch's OpenMP workers spin-wait after each operation (libgomp's default: 300,000 spins) before
they sleep. A client whose workers spin while a server on the same cores computes takes CPU time
from it at every step, and a busy machine makes both collapse. corolla's own commands start with
``GOMP_SPINCOUNT=10000`` (``corolla.cli``); a Python process is the user's, so the client only
says so, once, when a server it found runs on this machine."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping

logger = logging.getLogger(__name__)

SPIN_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
SUGGESTED_SPINCOUNT = "10000"
_IP = re.compile(r"^/ip[46]/([^/]+)/")
_hinted = False


def is_local(addrs: Iterable[str], local_ips: set[str]) -> bool:
    """Whether a server announcing ``addrs`` runs on this machine: each of its IP addresses is one
    of ours (loopback included); a record without IP addresses tells nothing."""
    ips = [m.group(1) for m in map(_IP.match, addrs) if m]
    return bool(ips) and all(ip in local_ips for ip in ips)


def spin_hint(servers_addrs: Iterable[Iterable[str]], local_ips: set[str], env: Mapping[str, str],
              threads: int) -> str | None:  # fmt: skip
    """The line to log when a server runs here and this process's OpenMP workers spin by default."""
    if threads <= 1 or any(name in env for name in SPIN_VARIABLES):
        return None
    if not any(is_local(addrs, local_ips) for addrs in servers_addrs):
        return None
    return (
        "a corolla server runs on this machine and shares its cores with this process: start Python "
        f"with GOMP_SPINCOUNT={SUGGESTED_SPINCOUNT} in the environment (as corolla's own commands do) "
        "so that idle PyTorch threads here stop spinning while the server computes"
    )


def hint_once(servers_addrs: Iterable[Iterable[str]]) -> None:
    """Log ``spin_hint`` at most once per process."""
    global _hinted
    if _hinted:
        return
    import torch

    message = spin_hint(servers_addrs, local_ips(), os.environ, torch.get_num_threads())
    if message:
        _hinted = True
        logger.warning(message)


def local_ips() -> set[str]:
    import psutil

    ips = {"127.0.0.1", "::1"}
    for addresses in psutil.net_if_addrs().values():
        ips.update(a.address.split("%")[0] for a in addresses if a.family.name in ("AF_INET", "AF_INET6"))
    return ips
