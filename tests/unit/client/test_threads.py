"""The hint a client gives when a server shares its machine and its OpenMP workers spin."""

from __future__ import annotations

from corolla.client.threads import is_local, spin_hint

HERE = {"127.0.0.1", "::1", "10.0.0.5"}
LOCAL = ("/ip4/127.0.0.1/tcp/4100", "/ip4/10.0.0.5/tcp/4100")
REMOTE = ("/ip4/10.0.0.9/tcp/4100", "/ip4/127.0.0.1/tcp/4100")


def test_a_server_is_local_when_every_address_it_announces_is_ours() -> None:
    assert is_local(LOCAL, HERE)
    assert is_local(("/ip6/::1/tcp/1",), HERE)
    assert not is_local(REMOTE, HERE)  # its loopback address is its own, not ours
    assert not is_local((), HERE)  # no address: nothing known
    assert not is_local(("/dns4/example.org/tcp/1",), HERE)


def test_the_hint_names_the_variable_only_when_it_helps() -> None:
    hint = spin_hint([REMOTE, LOCAL], HERE, {}, threads=2)
    assert hint is not None and "GOMP_SPINCOUNT=10000" in hint
    assert spin_hint([REMOTE], HERE, {}, threads=2) is None  # no server here
    assert spin_hint([LOCAL], HERE, {"GOMP_SPINCOUNT": "1000"}, threads=2) is None  # already chosen
    assert spin_hint([LOCAL], HERE, {"OMP_WAIT_POLICY": "PASSIVE"}, threads=2) is None
    assert spin_hint([LOCAL], HERE, {}, threads=1) is None  # no workers to spin
