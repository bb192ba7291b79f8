"""A DHT peer's processes live and die with the process that started it.

hivemind runs each DHT peer in a forked process, which starts the libp2p daemon (``p2pd``). Left
alone, both outlive their parent when it is SIGKILLed (``kill -9``, the OOM killer): a live DHT
peer listening on the machine's addresses, for as long as the machine runs. And a terminal's
Ctrl-C reached all three processes at once: ``p2pd`` exited before the parent could shut down in
order, so the parent's shutdown waited on a dead daemon.

``forking_dht()`` marks the fork that starts a DHT peer; in that child only (no other fork of the
process, a user's own included, is touched):

- a process group of its own, which ``p2pd`` inherits: a terminal's Ctrl-C (SIGINT to the
  foreground group) reaches only the parent, which then shuts its DHT peer down in order;
- default SIGTERM handling, not the parent's asyncio handlers (hivemind ends a DHT process that
  does not stop in time with SIGTERM);
- a watchdog thread: once the parent is gone, it ends the child's own children (``p2pd``) and
  exits, within about a second, however the parent died.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Iterator

import psutil

POLL_SECONDS = 0.2  # how often the child looks for its parent
TERMINATE_GRACE = 2.0  # how long p2pd gets to exit on SIGTERM before SIGKILL

_marked = threading.local()
_parent_pid: int | None = None  # set just before a marked fork; read in the child


@contextlib.contextmanager
def forking_dht() -> Iterator[None]:
    """A DHT peer started (forked) inside this block is tied to this process's life."""
    _register_fork_hooks()
    _marked.active = True
    try:
        yield
    finally:
        _marked.active = False


@functools.cache
def _register_fork_hooks() -> None:
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _before_fork() -> None:
    global _parent_pid
    _parent_pid = os.getpid() if getattr(_marked, "active", False) else None


def _after_fork_in_child() -> None:
    parent = _parent_pid
    if parent is None:
        return  # not the fork of a DHT peer
    _marked.active = False
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    with contextlib.suppress(ValueError):  # the parent's asyncio loop set one; it is not ours
        signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), name="corolla-lifeline", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    end_children()
    os._exit(0)


def end_children(grace: float = TERMINATE_GRACE) -> None:
    """SIGTERM every descendant of this process, then SIGKILL those still alive after ``grace``."""
    with contextlib.suppress(psutil.Error):
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, alive = psutil.wait_procs(children, timeout=grace)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
