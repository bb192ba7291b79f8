"""The one thread that does a server's heavy PyTorch work: loading, measuring and serving.

On CPU, PyTorch's OpenMP gives every thread that computes a team of worker threads of its own.
Once a process has more such threads than the machine has cores, libgomp stops letting idle
workers spin between operations, and every one of a pass's hundreds of operations waits for its
workers to be woken: on 2 cores, the built-in model's decode pass took 31 ms instead of 22 ms as
soon as a second thread had computed anything (loading the span, measuring throughput). So
everything heavy runs here, on one thread, one thing at a time."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def compute_executor() -> ThreadPoolExecutor:
    """The process's compute thread (started on first use, again after ``shutdown``)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")
        return _executor


async def on_compute_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)`` on the compute thread, awaited from the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(compute_executor(), functools.partial(call, *args, **kwargs))


def shutdown() -> None:
    """Drop queued work and let the thread end (at process exit)."""
    global _executor
    with _lock:
        executor, _executor = _executor, None
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)
