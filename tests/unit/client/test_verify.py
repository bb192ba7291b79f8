"""Verified outputs: the decision rules (client/verify.py) and the session's use of them, on fake
servers whose "blocks" are a causal function of everything they were sent (like a KV cache)."""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from typing import Any

import pytest
import torch

from corolla.client import session as session_module
from corolla.client.bans import BanList
from corolla.client.routing import Hop, latency_route
from corolla.client.session import InferenceSession
from corolla.client.transport import EventLoopThread
from corolla.client.verify import (
    DEFAULT_TOLERANCES,
    Opinion,
    VerificationError,
    VerificationReport,
    decide,
    relative_error,
    tolerance_for,
    verifier_candidates,
    vote,
)
from corolla.config import ClientConfig
from corolla.errors import ConfigError, ServerUnavailable
from corolla.swarm.spans import ServerSpan
from helpers.swarm import span

HIDDEN = 8


def _out(seed: int = 0, shape: tuple[int, ...] = (1, 4, HIDDEN)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _noisy(x: torch.Tensor, scale: float, seed: int = 1) -> torch.Tensor:
    return x + scale * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


# --- comparing outputs --------------------------------------------------------------------------


def test_relative_error_is_per_token_and_symmetric() -> None:
    a = _out()
    assert relative_error(a, a.clone()) == 0.0
    b = a.clone()
    b[0, 2] *= 1.01  # one token 1% off: the others do not dilute it
    assert relative_error(a, b) == pytest.approx(0.01 / 1.01, rel=1e-4)
    assert relative_error(a, b) == relative_error(b, a)
    assert relative_error(a, a[:, :3]) == math.inf
    c = a.clone()
    c[0, 0, 0] = float("nan")
    assert relative_error(a, c) == math.inf


def test_tolerance_is_the_looser_dtype_unless_overridden() -> None:
    assert tolerance_for("float32") == DEFAULT_TOLERANCES["float32"] == 1e-3
    assert tolerance_for("float32", "bfloat16") == DEFAULT_TOLERANCES["bfloat16"]
    assert tolerance_for("float16", "float32") == DEFAULT_TOLERANCES["float16"]
    assert tolerance_for("bfloat16", override=1e-4) == 1e-4
    assert DEFAULT_TOLERANCES["float32"] < DEFAULT_TOLERANCES["float16"] < DEFAULT_TOLERANCES["bfloat16"]


def test_rounding_noise_of_a_dtype_agrees_and_five_percent_noise_does_not() -> None:
    x = _out(3, (1, 16, 64))
    for dtype in ("float16", "bfloat16"):
        rounded = x.to(getattr(torch, dtype)).float()
        assert relative_error(x, rounded) < tolerance_for(dtype) / 4
    assert relative_error(x, _noisy(x, 0.05)) > tolerance_for("float32") * 10
    assert relative_error(x, _noisy(x, 0.05)) > tolerance_for("float16")


# --- voting -------------------------------------------------------------------------------------


def test_two_agreeing_opinions_are_a_unanimous_majority() -> None:
    x = _out()
    verdict = vote([Opinion("a", x), Opinion("b", x + 1e-7)])
    assert verdict.unanimous and verdict.majority == (0, 1) and verdict.losers == ()


def test_the_majority_outvotes_one_server() -> None:
    x = _out()
    verdict = vote([Opinion("liar", _noisy(x, 0.05)), Opinion("b", x), Opinion("c", x.clone())])
    assert verdict.majority == (1, 2) and verdict.losers == (0,)
    assert verdict.errors[0] > 1e-2 and verdict.errors[1] == verdict.errors[2] == 0.0


def test_no_majority_between_two_or_a_tie() -> None:
    x = _out()
    assert not vote([Opinion("a", x), Opinion("b", _noisy(x, 0.05))]).settled
    assert not vote([Opinion("a", x)]).settled  # one server is no majority
    y = _noisy(x, 0.05)
    tie = vote([Opinion("a", x), Opinion("b", x), Opinion("c", y), Opinion("d", y.clone())])
    assert not tie.settled and len(tie.groups) == 2
    three_ways = vote([Opinion(p, _noisy(x, 0.05, seed=i)) for i, p in enumerate("abc")])
    assert not three_ways.settled and len(three_ways.groups) == 3


def test_decide_asks_one_verifier_when_it_agrees() -> None:
    x = _out()
    asked: list[frozenset[str]] = []

    def ask(heard: frozenset[str]) -> Opinion | None:
        asked.append(heard)
        return Opinion(f"v{len(asked)}", x.clone())

    verdict, opinions = decide([Opinion("primary", x)], ask)
    assert verdict.unanimous and [o.peer_id for o in opinions] == ["primary", "v1"]
    assert asked == [frozenset({"primary"})]


def test_decide_asks_a_third_opinion_on_a_disagreement() -> None:
    x = _out()
    others = iter([Opinion("v1", x), Opinion("v2", x.clone())])
    verdict, opinions = decide([Opinion("liar", _noisy(x, 0.05))], lambda heard: next(others))
    assert [opinions[i].peer_id for i in verdict.losers] == ["liar"]
    assert [opinions[i].peer_id for i in verdict.majority or ()] == ["v1", "v2"]


def test_decide_stops_without_a_majority_when_no_server_is_left() -> None:
    x = _out()
    others = iter([Opinion("v1", _noisy(x, 0.05)), None])
    verdict, opinions = decide([Opinion("a", x)], lambda heard: next(others))
    assert not verdict.settled and len(opinions) == 2


def test_verifier_candidates_hold_every_block_of_the_hop() -> None:
    spans = [span("a", 0, 3), span("b", 0, 6), span("c", 1, 3), span("d", 0, 2), span("e", 0, 3)]
    assert [s.peer_id for s in verifier_candidates(spans, 0, 3, exclude={"a"})] == ["b", "e"]
    with_adapter = [span("x", 0, 3, adapters=("lora",)), span("y", 0, 3)]
    assert [s.peer_id for s in verifier_candidates(with_adapter, 0, 3, adapter="lora")] == ["x"]


# --- the report ---------------------------------------------------------------------------------


def test_sampling_takes_the_configured_share_of_steps() -> None:
    report = VerificationReport(0.25, seed=7)
    chosen = sum(report.sample() for _ in range(8000))
    assert 1800 < chosen < 2200 and report.steps == 8000 and report.verified_steps == chosen
    assert not any(VerificationReport(0.0).sample() for _ in range(100))
    assert all(VerificationReport(1.0).sample() for _ in range(100))
    with pytest.raises(ConfigError, match="verify_fraction"):
        VerificationReport(1.5)


def test_record_bans_the_outvoted_server_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    x = _out()
    opinions = [Opinion("peer-of-the-liar", _noisy(x, 0.05)), Opinion("b", x), Opinion("c", x)]
    report = VerificationReport(1.0)
    with caplog.at_level(logging.WARNING, logger="corolla.client.verify"):
        losers = report.record(vote(opinions), opinions, step=3, start=0, end=3, tolerance=None)
    assert losers == ["peer-of-the-liar"] and list(report.banned) == ["peer-of-the-liar"]
    (d,) = report.disagreements
    assert d.resolved and d.step == 3 and d.majority == ("b", "c") and d.losers == ("peer-of-the-liar",)
    assert "...the-liar disagrees with the majority" in caplog.text
    assert "banned: ...the-liar" in report.summary()


def test_record_raises_on_two_servers_that_disagree() -> None:
    x = _out()
    opinions = [Opinion("server-aaaaaaaa", x), Opinion("server-bbbbbbbb", _noisy(x, 0.05))]
    report = VerificationReport(1.0)
    with pytest.raises(VerificationError, match=r"\.\.\.aaaaaaaa.*\.\.\.bbbbbbbb.*will not guess"):
        report.record(vote(opinions), opinions, step=1, start=3, end=6, tolerance=None)
    assert not report.disagreements[0].resolved and report.banned == {}


# --- the session, on fake servers ----------------------------------------------------------------


def blocks(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The fake model: each block adds half the running mean of its inputs (causal, so a server that
    computes a token at a time gives what a whole sequence at once gives)."""
    for b in range(start, end):
        mean = x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
        x = x + 0.5 * mean + 0.01 * (b + 1)
    return x


class FakeServers:
    """Per peer: faulty or dead; counts requests and tokens."""

    def __init__(self, faulty: set[str] = frozenset(), dead: set[str] = frozenset(),  # type: ignore[assignment]
                 dies_after: dict[str, int] | None = None) -> None:  # fmt: skip
        self.faulty, self.dead, self.dies_after = set(faulty), set(dead), dict(dies_after or {})
        self.delays: dict[str, float] = {}  # seconds a request to this server takes
        self.requests: dict[str, int] = {}
        self.tokens: dict[str, int] = {}


class FakeStream:
    """A server's session: keeps the inputs it was sent (its "cache") and recomputes."""

    servers: FakeServers

    def __init__(self, p2p: Any, peer_id: str, start: int, end: int, max_length: int, batch_size: int,
                 *, push_to: Any = None, adapter: str | None = None,
                 reply_dtype: str | None = None) -> None:  # fmt: skip
        self.peer_id, self.start, self.end = peer_id, start, end
        self.session_id = uuid.uuid4().hex
        self.inputs: torch.Tensor | None = None
        self.position, self.closed = 0, False

    async def step(self, hidden: torch.Tensor, position: int, timeout: float, step_id: int = 0,
                   prompts: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        servers = self.servers
        servers.requests[self.peer_id] = servers.requests.get(self.peer_id, 0) + 1
        await asyncio.sleep(servers.delays.get(self.peer_id, 0.002))  # fails if closed meanwhile
        if self.closed:
            raise ServerUnavailable(f"server ...{self.peer_id[-8:]}: stream closed")
        limit = servers.dies_after.get(self.peer_id, math.inf)
        if self.peer_id in servers.dead or servers.requests[self.peer_id] > limit:
            raise ServerUnavailable(f"server ...{self.peer_id[-8:]} is dead")
        servers.tokens[self.peer_id] = servers.tokens.get(self.peer_id, 0) + hidden.shape[1]
        past = self.inputs[:, :position] if self.inputs is not None else hidden[:, :0]
        assert past.shape[1] == position, "a step must continue the session's positions"
        self.inputs = torch.cat([past, hidden], dim=1)
        out = blocks(self.inputs, self.start, self.end)[:, position:]
        if self.peer_id in servers.faulty:
            out = _noisy(out, 0.05, seed=position)
        self.position = position + hidden.shape[1]
        return out

    async def close(self) -> None:
        self.closed = True


class FakeManager:
    def __init__(self, spans: list[ServerSpan], config: ClientConfig) -> None:
        self._spans, self.config = spans, config
        self.num_blocks, self.adapter, self.p2p = 6, None, None
        self.loop = EventLoopThread.get()
        self.bans = BanList(config.ban_timeout)

    def spans(self, *, refresh: bool = False) -> list[ServerSpan]:
        return self._spans

    def route(self, start: int = 0, end: int | None = None, *, cause: str | None = None,
              mode: str = "latency", exclude: frozenset[str] = frozenset()) -> list[Hop]:  # fmt: skip
        route = latency_route(self._spans, start, end or self.num_blocks, rtt={},
                              banned=self.bans.banned() | exclude)  # fmt: skip
        assert route is not None, "no route"
        return route

    def failed(self, hop: Hop, error: Exception, failures: int) -> str:
        self.bans.ban(hop.peer_id)
        return f"...{hop.peer_id[-8:]} failed: {error}"

    @staticmethod
    def peer(hop: Hop) -> str:
        return hop.peer_id

    def addrs_of(self, peer_id: str) -> tuple[str, ...]:
        return ()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``fake(spans, faulty=..., dead=..., **config)`` -> (session, servers)."""

    def make(spans: list[ServerSpan], faulty: set[str] = frozenset(), dead: set[str] = frozenset(),  # type: ignore[assignment]
             dies_after: dict[str, int] | None = None, **config: Any
             ) -> tuple[InferenceSession, FakeServers]:  # fmt: skip
        servers = FakeServers(faulty, dead, dies_after)
        stream = type("Stream", (FakeStream,), {"servers": servers})
        monkeypatch.setattr(session_module, "InferenceStream", stream)
        config = {"verify_fraction": 1.0, "verify_seed": 0, **config}
        return InferenceSession(FakeManager(spans, ClientConfig(**config)), max_length=64), servers  # type: ignore[arg-type]

    return make


def run_steps(session: InferenceSession, steps: int = 12, prompt: int = 4
              ) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
    """A prompt, then one position per step; returns each step's output and the inputs."""
    inputs = _out(42, (1, prompt + steps - 1, HIDDEN))
    outs = [session.step(inputs[:, :prompt])]
    outs += [session.step(inputs[:, t : t + 1]) for t in range(prompt, inputs.shape[1])]
    return outs, inputs


def honest(inputs: torch.Tensor, prompt: int = 4) -> list[torch.Tensor]:
    full = blocks(inputs, 0, 6)
    return [full[:, :prompt]] + [full[:, t : t + 1] for t in range(prompt, inputs.shape[1])]


def test_session_on_honest_servers_checks_every_hop_and_agrees(fake) -> None:  # type: ignore[no-untyped-def]
    session, servers = fake([span("a", 0, 3), span("b", 0, 3), span("c", 3, 6), span("d", 3, 6)])
    outs, inputs = run_steps(session)
    assert all(torch.equal(o, e) for o, e in zip(outs, honest(inputs), strict=True))
    report = session.verification
    assert report.steps == report.verified_steps == 12 and report.checks == 24
    assert report.disagreements == [] and report.banned == {} and report.max_agreeing_error == 0.0
    # one request per hop per verified step; tokens: each verifier is sent each position once
    assert report.extra_requests == 24 and report.extra_tokens == 2 * inputs.shape[1]
    session.close()


def test_session_outvotes_a_faulty_server_and_continues_exactly(fake, caplog) -> None:  # type: ignore[no-untyped-def]
    spans = [span("a", 0, 3), span("liar", 0, 3, 1000.0), span("b", 0, 3), span("c", 3, 6), span("d", 3, 6)]
    session, servers = fake(spans, faulty={"liar"})
    assert session.manager.route()[0].peer_id == "liar"  # routing prefers it
    with caplog.at_level(logging.WARNING):
        outs, inputs = run_steps(session)
    assert all(torch.equal(o, e) for o, e in zip(outs, honest(inputs), strict=True))
    report = session.verification
    assert list(report.banned) == ["liar"] and "...liar disagrees with the majority" in caplog.text
    (d,) = report.disagreements
    assert d.step == 1 and d.primary == "liar" and d.losers == ("liar",) and set(d.majority) == {"a", "b"}
    assert "liar" not in {h.peer_id for h in session.route}
    assert servers.requests["liar"] == 1  # caught on its first step
    session.close()


@pytest.mark.parametrize("faulty_first", [True, False], ids=["liar-upstream", "liar-downstream"])
def test_a_liar_caught_late_leaves_no_trace_in_later_steps(fake, faulty_first: bool) -> None:  # type: ignore[no-untyped-def]
    """With a quarter of the steps verified, the liar's unchecked outputs reached later servers'
    caches; once caught, its blocks and every later hop are rebuilt from the honest replay."""
    liar_span = (0, 3) if faulty_first else (3, 6)
    spans = [span("a", 0, 3), span("b", 0, 3), span("c", 3, 6), span("d", 3, 6)]
    spans.append(span("liar", *liar_span, 1000.0))
    session, _ = fake(spans, faulty={"liar"}, verify_fraction=0.25, verify_seed=5)  # first check: step 7
    outs, inputs = run_steps(session, steps=24)
    (d,) = session.verification.disagreements
    assert d.step > 1, "this seed must catch the liar after some unchecked steps"
    expected = honest(inputs)
    assert not torch.allclose(outs[0], expected[0])  # before: the liar's outputs
    assert all(torch.equal(o, e) for o, e in zip(outs[d.step - 1 :], expected[d.step - 1 :], strict=True))


def test_an_outvoted_verifier_is_banned_and_the_route_kept(fake) -> None:  # type: ignore[no-untyped-def]
    for seed in range(20):
        spans = [span("fast", 3, 6, 1000.0), span("liar", 3, 6), span("d", 3, 6), span("a", 0, 3)]
        session, _ = fake(spans, faulty={"liar"}, verify_seed=seed)
        outs, inputs = run_steps(session, steps=4)
        assert all(torch.equal(o, e) for o, e in zip(outs, honest(inputs), strict=True))
        assert session.route[1].peer_id == "fast"
        if session.verification.banned:
            assert list(session.verification.banned) == ["liar"]
            assert session.verification.disagreements[0].primary == "fast"
            break
    else:
        pytest.fail("no seed picked the liar as a verifier")


def test_a_dead_verifier_is_skipped(fake) -> None:  # type: ignore[no-untyped-def]
    spans = [span("a", 0, 3), span("dead", 0, 3), span("b", 0, 3), span("c", 3, 6), span("d", 3, 6)]
    session, servers = fake(spans, dead={"dead"})
    outs, inputs = run_steps(session, steps=3)
    assert all(torch.equal(o, e) for o, e in zip(outs, honest(inputs), strict=True))
    assert session.verification.disagreements == [] and session.verification.checks == 6


def test_a_server_dying_during_a_verified_step_is_failed_over_cleanly(fake) -> None:  # type: ignore[no-untyped-def]
    """The hop's server dies while its verifier's request is in flight: failover and replay as
    usual, the verifier is not blamed, the outputs stay exact."""
    # c is fast, d slow (routed to only as a verifier), x + y faster than d: c's blocks go to x + y
    spans = [span("a", 0, 3), span("b", 0, 3), span("c", 3, 6, 1000.0), span("d", 3, 6, 0.5)]
    spans += [span("x", 3, 5, 100.0), span("y", 5, 6, 100.0)]
    session, servers = fake(spans, dies_after={"c": 5})
    servers.delays["d"] = 0.05  # c fails while d's request for the same step is in flight
    assert [h.peer_id for h in session.manager.route()] == ["a", "c"]
    outs, inputs = run_steps(session, steps=10)
    assert all(torch.equal(o, e) for o, e in zip(outs, honest(inputs), strict=True))
    assert [h.peer_id for h in session.route][1:] == ["x", "y"] and session.manager.bans.banned() == {"c"}
    report = session.verification
    assert report.disagreements == [] and report.banned == {} and report.unverifiable == 0


def test_two_servers_that_disagree_raise_and_close_the_session(fake) -> None:  # type: ignore[no-untyped-def]
    session, _ = fake([span("a", 0, 3), span("c", 3, 6), span("liar", 3, 6, 1000.0)], faulty={"liar"})
    with pytest.raises(VerificationError, match=r"blocks 3:6.*\.\.\.liar.*\.\.\.c .*will not guess"):
        run_steps(session, steps=2)
    assert session.closed and not session.verification.disagreements[0].resolved
    assert session.verification.unverifiable == 1  # blocks 0:3 have one server: not checked


def test_verification_off_sends_nothing_extra(fake) -> None:  # type: ignore[no-untyped-def]
    session, servers = fake([span("a", 0, 3), span("b", 0, 3), span("c", 3, 6)], verify_fraction=0.0)
    run_steps(session, steps=5)
    assert session.verification.extra_requests == 0 and session.verification.verified_steps == 0
    assert set(servers.requests) in ({"a", "c"}, {"b", "c"})  # the route's servers only
