"""Every supported family, served by two servers splitting its blocks, matches local transformers.

For each family a tiny seeded random model (4 blocks) is served by two real server processes
(blocks 0:2 and 2:4); the client checks full-sequence logits (fp32, within 1e-4) and 16 greedy
tokens generated in an inference session (identical)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from corolla.models.families import SUPPORTED_FAMILIES
from helpers.models import FAMILY_VARIANTS, save_tiny_family

SPLIT = [(0, 2), (2, 4)]


def test_every_supported_family_has_a_variant_here() -> None:
    assert {model_type for model_type, _ in FAMILY_VARIANTS.values()} == set(SUPPORTED_FAMILIES)


@pytest.fixture(scope="module", params=list(FAMILY_VARIANTS))
def served(
    request: pytest.FixtureRequest, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, str]]:
    """One family's tiny model on two servers, under its own DHT prefix."""
    variant: str = request.param
    path = save_tiny_family(tmp_path_factory.mktemp(variant), variant)
    servers = start_swarm(
        str(path),
        SPLIT,
        initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", variant],
        log_dir=tmp_path_factory.mktemp(f"{variant}-logs"),
    )
    try:
        yield path, variant
    finally:
        stop_all(servers)


@pytest.fixture(scope="module")
def models(served: tuple[Path, str], dht_peer: LocalServer):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    path, variant = served
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=[dht_peer.maddr or ""], dht_prefix=variant
    )
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield remote, local
    remote.manager.shutdown()


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def test_full_sequence_logits_match_local(models) -> None:  # type: ignore[no-untyped-def]
    remote, local = models
    ids = prompt(20, seed=1)  # longer than the sliding windows (8)
    with torch.no_grad():
        got, expected = remote(ids).logits, local(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_tokens_in_a_session_match_local(models) -> None:  # type: ignore[no-untyped-def]
    remote, local = models
    ids = prompt(6, seed=2)
    with torch.no_grad():
        expected = local.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        with remote.inference_session(max_length=32):
            got = remote.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert got.shape[1] == ids.shape[1] + 16
    assert torch.equal(got, expected)
