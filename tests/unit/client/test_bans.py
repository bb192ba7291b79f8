from __future__ import annotations

from corolla.client.bans import BanList


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ban_expires_and_doubles_on_each_new_failure() -> None:
    clock = Clock()
    bans = BanList(base=10.0, cap=35.0, clock=clock)
    assert bans.ban("a") == 10.0
    assert bans.banned() == {"a"}
    clock.now += 10.5
    assert bans.banned() == frozenset()  # recovered: usable again
    assert bans.ban("a") == 20.0
    assert bans.ban("a") == 35.0  # capped
    clock.now += 34.0
    assert bans.banned() == {"a"}


def test_forgiving_a_server_resets_its_back_off() -> None:
    clock = Clock()
    bans = BanList(base=10.0, clock=clock)
    bans.ban("a")
    bans.ban("a")
    bans.forgive("a")
    assert bans.banned() == frozenset()
    assert bans.ban("a") == 10.0


def test_bans_are_per_server() -> None:
    bans = BanList(base=1.0, clock=Clock())
    bans.ban("a")
    assert bans.banned() == {"a"}
    bans.ban("b")
    assert bans.banned() == {"a", "b"}
