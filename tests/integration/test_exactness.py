"""A tiny model served by one, two and three servers gives exactly what local transformers gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all

SPLITS = {
    "one": [(0, 6)],
    "two": [(0, 3), (3, 6)],
    "three": [(0, 2), (2, 4), (4, 6)],
}


@pytest.fixture(scope="module")
def swarm(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """All three layouts in one swarm, each under its own DHT prefix."""
    log_dir = tmp_path_factory.mktemp("exactness")
    servers: list[LocalServer] = []
    try:
        for prefix, splits in SPLITS.items():
            servers += start_swarm(
                str(tiny_gqa_dir),
                splits,
                initial_peers=[dht_peer.maddr or ""],
                extra_args=["--dht_prefix", prefix],
                log_dir=log_dir,
            )
        yield dht_peer.maddr or ""
    finally:
        stop_all(servers)


@pytest.fixture(scope="module", params=list(SPLITS))
def remote_model(request: pytest.FixtureRequest, swarm: str, tiny_gqa_dir: Path):  # type: ignore[no-untyped-def]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[swarm], dht_prefix=request.param
    )
    yield model
    model.manager.shutdown()


def prompt(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def test_full_sequence_logits_match_local(remote_model, local_model) -> None:  # type: ignore[no-untyped-def]
    ids = prompt(20)
    with torch.no_grad():
        remote = remote_model(ids).logits
        local = local_model(ids).logits
    assert remote.shape == local.shape
    assert (remote - local).abs().max().item() <= 1e-4


def test_greedy_generation_in_a_session_matches_local(remote_model, local_model) -> None:  # type: ignore[no-untyped-def]
    ids = prompt(8, seed=2)
    with torch.no_grad():
        expected = local_model.generate(ids, max_new_tokens=32, do_sample=False)
        with remote_model.inference_session(max_length=64) as session:
            got = remote_model.generate(ids, max_new_tokens=32, do_sample=False)
            assert session.position == ids.shape[1] + 31  # the last token is sampled, not yet sent
    assert torch.equal(got, expected)
    assert got.shape[1] == ids.shape[1] + 32


def test_second_generate_continues_the_session(remote_model, local_model) -> None:  # type: ignore[no-untyped-def]
    first, follow_up = prompt(6, seed=3), prompt(4, seed=4)
    with torch.no_grad(), remote_model.inference_session(max_length=64) as session:
        answer1 = remote_model.generate(first, max_new_tokens=8, do_sample=False)
        answer2 = remote_model.generate(follow_up, max_new_tokens=8, do_sample=False, session=session)
        history = torch.cat([answer1, follow_up], dim=1)
        expected = local_model.generate(history, max_new_tokens=8, do_sample=False)
    assert torch.equal(answer2, expected[:, answer1.shape[1] :])
    assert session.closed


def test_route_uses_the_expected_servers(remote_model, request: pytest.FixtureRequest) -> None:  # type: ignore[no-untyped-def]
    prefix = remote_model.manager.dht_prefix
    route = remote_model.manager.route()
    assert [(h.start, h.end) for h in route] == SPLITS[prefix]
