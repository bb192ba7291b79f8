"""Fixtures shared by the whole suite."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from helpers.models import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint (4 blocks, hidden 64, vocab 128, float32, seeded) in a tmp dir."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), dtype="float32")


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the whole suite: no new ``corolla-*`` entry in the temporary directory, and no server,
    DHT peer or ``p2pd`` the suite started still running."""
    before = _temp_entries()
    yield
    left = sorted(_temp_entries() - before)
    deadline = time.monotonic() + 5.0  # killed servers' helpers follow them within about a second
    while (running := _our_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    problems = [f"left in {tempfile.gettempdir()}: {left}"] if left else []
    problems += [f"still running: {running}"] if running else []
    assert not problems, "; ".join(problems)


def _temp_entries() -> set[str]:
    return {entry.name for entry in Path(tempfile.gettempdir()).glob("corolla-*")}


def _our_processes() -> list[str]:
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(process.cmdline())
            ours = "p2pd" in process.name() or "corolla.cli" in cmdline
            if ours and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {cmdline[:100]}")
    return found
