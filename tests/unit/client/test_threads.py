"""A client sharing its machine with a server: one thread for its own layers while it generates."""

from __future__ import annotations

import logging

import pytest
import torch

from corolla.client import threads
from corolla.client.threads import any_local, generate_threads, is_local, shared_cores_note, while_generating

HERE = {"127.0.0.1", "::1", "10.0.0.5"}
LOCAL = ("/ip4/127.0.0.1/tcp/4100", "/ip4/10.0.0.5/tcp/4100")
REMOTE = ("/ip4/10.0.0.9/tcp/4100", "/ip4/127.0.0.1/tcp/4100")


def test_a_server_is_local_when_every_address_it_announces_is_ours() -> None:
    assert is_local(LOCAL, HERE)
    assert is_local(("/ip6/::1/tcp/1",), HERE)
    assert not is_local(REMOTE, HERE)  # its loopback address is its own, not ours
    assert not is_local((), HERE)  # no address: nothing known
    assert not is_local(("/dns4/example.org/tcp/1",), HERE)
    assert any_local([REMOTE, LOCAL], HERE) and not any_local([REMOTE], HERE)


def test_one_thread_only_where_a_server_shares_the_cores_and_workers_would_spin() -> None:
    assert generate_threads(True, {}, threads=2) == 1
    assert generate_threads(True, {}, threads=16) == 1
    assert generate_threads(False, {}, threads=2) is None  # no server here
    assert generate_threads(True, {"GOMP_SPINCOUNT": "10000"}, threads=2) is None  # the user chose
    assert generate_threads(True, {"OMP_WAIT_POLICY": "PASSIVE"}, threads=2) is None
    assert generate_threads(True, {}, threads=1) is None  # no workers to spin


def test_the_note_says_what_happens_and_what_keeps_every_thread() -> None:
    note = shared_cores_note(2)
    assert "1 thread instead of 2" in note and "GOMP_SPINCOUNT=10000" in note


@pytest.fixture
def two_threads(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for name in threads.SPIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_said", False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_generating_beside_a_server_uses_one_thread_then_gives_the_count_back(
    two_threads: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="corolla.client.threads"):
        with while_generating(server_here=True):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), while_generating(server_here=True):
            raise RuntimeError("generate failed")
        assert torch.get_num_threads() == 2  # given back on errors too
    notes = [r for r in caplog.records if "shares its cores" in r.getMessage()]
    assert len(notes) == 1  # said once per process


def test_generating_alone_or_with_the_spinning_chosen_changes_nothing(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with while_generating(server_here=False):
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    with while_generating(server_here=True):
        assert torch.get_num_threads() == 2
