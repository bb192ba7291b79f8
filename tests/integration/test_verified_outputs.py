"""Verified outputs on real servers: honest ones, and one whose blocks add noise to their outputs
(tests/helpers/faulty_server.py, test-only) and announce a high throughput so that routing prefers it.

The swarm: blocks 0:3 on two honest servers, 3:6 on two honest servers; the faulty server joins on
0:3. It computes its first ``HONEST_CALLS`` steps correctly, then lies on every step: by then it
pushes its outputs straight to the next server, whose cache the client must rebuild when it is
caught. The tests run in this order (the faulty server's first steps are the second test's, the
last test stops an honest server)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.client.verify import VerificationError, VerificationReport
from corolla.config import ClientConfig
from corolla.lab.local_swarm import LOOPBACK, LocalServer, server_args, start_swarm, stop_all

PREFIX = "verified"
TESTS_DIR = Path(__file__).resolve().parents[1]
HONEST = [(0, 3), (0, 3), (3, 6), (3, 6)]
NEW_TOKENS = 24
HONEST_CALLS = 4
VERIFY_ALL = ClientConfig(verify_fraction=1.0, verify_seed=0, step_timeout=20.0, max_wait_for_blocks=20.0)


def peer_of(server: LocalServer) -> str:
    assert server.maddr is not None
    return server.maddr.rsplit("/p2p/", 1)[1]


@pytest.fixture(scope="module")
def honest_servers(tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[list[LocalServer]]:  # fmt: skip
    servers = start_swarm(str(tiny_gqa_dir), HONEST, initial_peers=[dht_peer.maddr or ""],
                          log_dir=tmp_path_factory.mktemp("honest"),
                          extra_args=["--dht_prefix", PREFIX, "--throughput", "1"])  # fmt: skip
    yield servers
    stop_all(servers)


@pytest.fixture(scope="module")
def faulty_server(tiny_gqa_dir: Path, dht_peer: LocalServer, honest_servers: list[LocalServer],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:  # fmt: skip
    """Blocks 0:3; after ``HONEST_CALLS`` correct steps, outputs + 5% (of their std) Gaussian noise
    on every step; throughput 1000."""
    serve = server_args(str(tiny_gqa_dir), (0, 3), LOOPBACK, [dht_peer.maddr or ""],
                        ["--dht_prefix", PREFIX, "--throughput", "1000"])  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    faults = ["--fault_noise", "0.05", "--fault_after", str(HONEST_CALLS)]
    server = LocalServer([*faults, *serve], env={"PYTHONPATH": pythonpath},
                         log_dir=tmp_path_factory.mktemp("faulty"), name="faulty-0-3",
                         module="helpers.faulty_server")  # fmt: skip
    try:
        server.wait_ready()
        assert "FAULTY SERVER (test only)" in server.log_path.read_text()
        yield server
    finally:
        server.stop()


def client(model_dir: Path, dht_peer: LocalServer, config: ClientConfig, servers: list[LocalServer]):  # type: ignore[no-untyped-def]
    """A client that sees exactly ``servers`` (waits for the DHT to show them)."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(model_dir), initial_peers=[dht_peer.maddr], dht_prefix=PREFIX, client_config=config
    )
    wanted = {peer_of(s) for s in servers}
    deadline = time.monotonic() + 60
    while {s.peer_id for s in model.manager.spans(refresh=True)} != wanted:
        assert time.monotonic() < deadline, "the swarm did not show the expected servers"
        time.sleep(0.5)
    return model


@pytest.fixture(scope="module")
def prompt_and_expected(local_model) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        return ids, local_model.generate(ids, max_new_tokens=32, do_sample=False)


def test_verification_on_an_honest_swarm_finds_nothing_and_changes_nothing(
    tiny_gqa_dir: Path,
    dht_peer: LocalServer,
    honest_servers: list[LocalServer],
    local_model,  # type: ignore[no-untyped-def]
    prompt_and_expected,  # type: ignore[no-untyped-def]
) -> None:
    model = client(tiny_gqa_dir, dht_peer, VERIFY_ALL, honest_servers)
    ids, expected = prompt_and_expected
    try:
        t0 = time.monotonic()
        with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        seconds = time.monotonic() - t0
        assert torch.equal(tokens, expected[:, : ids.shape[1] + NEW_TOKENS])
        report = session.verification
        assert report.steps == report.verified_steps == NEW_TOKENS
        assert report.checks == 2 * NEW_TOKENS and report.unverifiable == 0  # both hops, every step
        assert report.disagreements == [] and report.banned == {}
        assert report.extra_requests == 2 * NEW_TOKENS
        assert report.max_agreeing_error < 1e-4  # fp32 on one machine: far below the 1e-3 tolerance
        print(f"\nhonest swarm, every step verified: {seconds:.1f} s; {report.summary()}; "
              f"max error between servers {report.max_agreeing_error:.1e}")  # fmt: skip

        timings = {}  # the cost in time: the same generation without and with verification
        for fraction in (0.0, 1.0):
            model.manager.config = dataclasses.replace(VERIFY_ALL, verify_fraction=fraction)
            t0 = time.monotonic()
            with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as again:
                assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), tokens)
            timings[fraction] = time.monotonic() - t0
            assert again.verification.verified_steps == (NEW_TOKENS if fraction else 0)
        print(f"{NEW_TOKENS} tokens: {timings[0.0]:.2f} s unverified, {timings[1.0]:.2f} s all verified")

        with torch.no_grad():  # a forward pass (no cache): re-run on another server, same result
            logits, reference = model(ids).logits, local_model(ids).logits
        assert torch.allclose(logits, reference, atol=1e-4)
        forward = model.manager.verification
        assert forward.checks == 2 and forward.disagreements == [] and forward.banned == {}
    finally:
        model.manager.shutdown()


def test_a_faulty_server_is_outvoted_banned_and_the_tokens_are_the_honest_ones(
    tiny_gqa_dir: Path,
    dht_peer: LocalServer,
    honest_servers: list[LocalServer],
    faulty_server: LocalServer,
    local_model,  # type: ignore[no-untyped-def]
    prompt_and_expected,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    faulty = peer_of(faulty_server)
    model = client(tiny_gqa_dir, dht_peer, VERIFY_ALL, [*honest_servers, faulty_server])
    ids, expected = prompt_and_expected
    try:
        assert model.manager.route()[0].peer_id == faulty  # routing prefers it (throughput 1000)
        t0 = time.monotonic()
        with (
            caplog.at_level(logging.WARNING),
            torch.no_grad(),
            model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session,
        ):
            tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            route_after = [h.peer_id for h in session.route]
        seconds = time.monotonic() - t0
        assert torch.equal(tokens, expected[:, : ids.shape[1] + NEW_TOKENS])
        report = session.verification
        assert list(report.banned) == [faulty] and faulty not in route_after
        (caught,) = report.disagreements
        # its first steps were right (and pushed to the next server); caught on its first lie
        assert caught.step == HONEST_CALLS + 1 and (caught.start, caught.end) == (0, 3)
        assert caught.primary == faulty
        assert caught.losers == (faulty,) and len(caught.majority) == 2 and caught.errors[faulty] > 1e-2
        assert f"server ...{faulty[-8:]} disagrees with the majority" in caplog.text
        print(f"\nfaulty server caught at step {caught.step} (error {caught.errors[faulty]:.1e}); "
              f"{seconds:.1f} s; {report.summary()}")  # fmt: skip

        model.manager.bans.forgive(faulty)  # the session also banned it client-wide (15 s)
        model.manager.verification = VerificationReport(0.0)  # unverified: its noise shows in the logits
        with torch.no_grad():
            reference = local_model(ids).logits
            assert not torch.allclose(model(ids).logits, reference, atol=1e-2)
        model.manager.verification = VerificationReport(1.0, seed=0)
        with torch.no_grad():  # a verified forward pass: the majority's output is used
            logits = model(ids).logits
        assert torch.allclose(logits, reference, atol=1e-4)
        assert list(model.manager.verification.banned) == [faulty]
    finally:
        model.manager.shutdown()


def spend_honest_calls(model, ids: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Make sure the faulty server lies from now on (when this test runs without the one before):
    unverified forward passes, which routing sends to it."""
    saved, model.manager.verification = model.manager.verification, VerificationReport(0.0)
    with torch.no_grad():
        for _ in range(HONEST_CALLS):
            model(ids)
    model.manager.verification = saved


def first_sampled_step(seed: int, fraction: float, steps: int) -> int | None:
    """The first step that ``VerificationReport(fraction, seed)`` verifies (before the liar is
    caught the sampler draws nothing else), None when it verifies none of ``steps``."""
    rng = random.Random(seed)
    return next((i + 1 for i in range(steps) if rng.random() < fraction), None)


def test_detection_rate_with_a_quarter_of_the_steps_verified(
    tiny_gqa_dir: Path,
    dht_peer: LocalServer,
    honest_servers: list[LocalServer],
    faulty_server: LocalServer,
    prompt_and_expected,  # type: ignore[no-untyped-def]
) -> None:
    """16 sessions of 32 steps, a quarter of the steps verified (seeds 0..15). The faulty server
    lies on every step, so it is caught at the first verified step: P(caught within n steps) =
    1 - 0.75**n (0.9999 for 32), after 1/0.25 = 4 steps on average."""
    runs, steps, fraction = 16, 32, 0.25
    faulty = peer_of(faulty_server)
    config = dataclasses.replace(VERIFY_ALL, verify_fraction=fraction)
    model = client(tiny_gqa_dir, dht_peer, config, [*honest_servers, faulty_server])
    ids, expected = prompt_and_expected
    rows = []
    try:
        spend_honest_calls(model, ids)
        t0 = time.monotonic()
        for seed in range(runs):
            model.manager.bans.forgive(faulty)  # a fresh start for each session
            model.manager.config = dataclasses.replace(config, verify_seed=seed)
            with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + steps) as session:
                tokens = model.generate(ids, max_new_tokens=steps, do_sample=False)
            report = session.verification
            caught = report.disagreements[0].step if report.disagreements else None
            assert caught == first_sampled_step(seed, fraction, steps)  # caught at its first check
            assert list(report.banned) == ([faulty] if caught else [])
            same = torch.equal(tokens, expected)
            rows.append((seed, caught, report.verified_steps, report.extra_requests, same))
        seconds = time.monotonic() - t0
    finally:
        model.manager.shutdown()
    caught_at = [r[1] for r in rows if r[1] is not None]
    verified = sum(r[2] for r in rows)
    print(f"\ndetection with verify_fraction={fraction}, {steps} steps, {runs} runs ({seconds:.0f} s):")
    for seed, step, n, extra, same in rows:
        print(f"  seed {seed:2d}: caught at step {step}, {n} steps verified, {extra} extra requests, "
              f"tokens {'equal' if same else 'differ from'} the honest ones")  # fmt: skip
    print(f"  caught in {len(caught_at)}/{runs} runs (theory {1 - (1 - fraction) ** steps:.4f}); "
          f"mean step {sum(caught_at) / max(len(caught_at), 1):.1f} (theory {1 / fraction:.0f}); "
          f"{verified}/{runs * steps} steps verified ({verified / (runs * steps):.2f})")  # fmt: skip
    assert len(caught_at) >= runs - 1
    assert abs(verified / (runs * steps) - fraction) < 0.08


def test_two_servers_that_disagree_raise_instead_of_guessing(
    tiny_gqa_dir: Path,
    dht_peer: LocalServer,
    honest_servers: list[LocalServer],
    faulty_server: LocalServer,
    prompt_and_expected,  # type: ignore[no-untyped-def]
) -> None:
    """One honest server of blocks 0:3 leaves: the faulty one and one honest one remain there, and
    no majority can tell which is right. (Stops a module server: keep this test last.)"""
    honest_servers[1].stop()
    remaining = [honest_servers[0], *honest_servers[2:], faulty_server]
    model = client(tiny_gqa_dir, dht_peer, VERIFY_ALL, remaining)
    ids, _ = prompt_and_expected
    faulty, honest = peer_of(faulty_server), peer_of(honest_servers[0])
    try:
        spend_honest_calls(model, ids)
        with (
            pytest.raises(VerificationError, match="no other server holds these blocks") as error,
            torch.no_grad(),
            model.inference_session(max_length=ids.shape[1] + 4) as session,
        ):
            model.generate(ids, max_new_tokens=4, do_sample=False)
        assert f"...{faulty[-8:]}" in str(error.value) and f"...{honest[-8:]}" in str(error.value)
        (unresolved,) = session.verification.disagreements
        assert not unresolved.resolved and set(unresolved.errors) == {faulty, honest}
        assert session.closed and session.verification.banned == {}
        print(f"\ntwo servers disagree: {error.value}")
    finally:
        model.manager.shutdown()
