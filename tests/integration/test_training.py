"""Training through a real two-server swarm: backward passes, prompt tuning, classification.

Servers keep their weights frozen and only run forward and backward passes; the client trains
its prompts (and a classifier's head) locally with a torch optimizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from helpers.models import save_tiny_llama

NUM_BLOCKS = 6  # tiny_gqa_dir
PREFIX = "training"
STEERABLE = "steerable"


@pytest.fixture(scope="module")
def steerable_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose weights (std 0.2) are large enough for a prompt to steer it;
    at the usual std 0.02 a random model's attention is too flat to learn anything in a few steps."""
    return save_tiny_llama(tmp_path_factory.mktemp("steerable"), vocab_size=256, initializer_range=0.2)


@pytest.fixture(scope="module")
def swarm(
    tiny_gqa_dir: Path, steerable_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("training")
    peers = [dht_peer.maddr or ""]
    servers: list[LocalServer] = []
    try:
        for path, prefix, split in ((tiny_gqa_dir, PREFIX, 3), (steerable_dir, STEERABLE, 2)):
            servers += start_swarm(
                str(path), [(0, split), (split, 2 * split)], initial_peers=peers,
                extra_args=["--dht_prefix", prefix], log_dir=log_dir,
            )  # fmt: skip
        yield peers[0]
    finally:
        stop_all(servers)


def remote(path: Path, peer: str, prefix: str = PREFIX, **kwargs: object):  # type: ignore[no-untyped-def]
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=[peer], dht_prefix=prefix, **kwargs
    )


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def local_with_deep_prompts(local, embeds: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Local transformers with ``deep[i]`` added to the prompt positions before layer ``i``
    (forward pre-hooks, independent of corolla's span code); returns the final-normed hidden states."""

    def hook_for(i: int):  # type: ignore[no-untyped-def]
        def add(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            n = deep.shape[2]
            hidden = torch.cat([hidden[:, :n] + deep[i], hidden[:, n:]], dim=1)
            return (hidden, *args[1:]), kwargs

        return add

    layers = local.model.layers
    handles = [m.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        return local.model(inputs_embeds=embeds).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()


def test_gradients_match_local_autograd(swarm: str, tiny_gqa_dir: Path) -> None:
    model = remote(tiny_gqa_dir, swarm)
    local = AutoModelForCausalLM.from_pretrained(tiny_gqa_dir, dtype=torch.float32).eval()
    try:
        tokens = ids(2, 9, seed=1)
        hidden_size = local.config.hidden_size
        weights = torch.randn(2, 9, hidden_size, generator=torch.Generator().manual_seed(2))
        deep = torch.randn(NUM_BLOCKS, 2, 3, hidden_size, generator=torch.Generator().manual_seed(3))

        embeds_remote = model.model.embed_tokens(tokens).detach().requires_grad_(True)
        deep_remote = (deep * 0.1).requires_grad_(True)
        from corolla.client.sequential import remote_sequential

        out = model.model.norm(remote_sequential(model.manager, embeds_remote, prompts=deep_remote))
        (out * weights).sum().backward()

        embeds_local = local.model.embed_tokens(tokens).detach().requires_grad_(True)
        deep_local = (deep * 0.1).requires_grad_(True)
        expected = local_with_deep_prompts(local, embeds_local, deep_local)
        (expected * weights).sum().backward()

        assert (out - expected).abs().max().item() <= 1e-4
        assert embeds_remote.grad is not None and deep_remote.grad is not None
        assert (embeds_remote.grad - embeds_local.grad).abs().max().item() <= 1e-4
        assert (deep_remote.grad - deep_local.grad).abs().max().item() <= 1e-4
        assert deep_remote.grad.abs().sum() > 0
    finally:
        model.manager.shutdown()


def synthetic_task() -> tuple[torch.Tensor, torch.Tensor]:
    """Make the model continue 8 random prompts with token 7 (labels -100 except the last)."""
    inputs = torch.cat([ids(8, 6, seed=4), torch.full((8, 1), 7)], dim=1)
    labels = torch.full_like(inputs, -100)
    labels[:, -1] = 7
    return inputs, labels


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_tuning_halves_the_loss(swarm: str, steerable_dir: Path, mode: str) -> None:
    model = remote(steerable_dir, swarm, STEERABLE, tuning_mode=mode, pre_seq_len=4)
    try:
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert {n for n, p in model.named_parameters() if p.requires_grad} == (
            {"prompt_embeddings.weight"}
            | ({"intermediate_prompt_embeddings.weight"} if mode == "deep_ptune" else set())
        )
        optimizer = torch.optim.Adam(trainable, lr=0.1)
        inputs, labels = synthetic_task()
        losses = []
        for _ in range(25):
            loss = model(input_ids=inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] <= losses[0] / 2, losses
        # the tuned prompt also steers generation inside an inference session
        with torch.no_grad():
            generated = model.generate(inputs[:1, :-1], max_new_tokens=1, do_sample=False)
        assert generated[0, -1].item() == 7
    finally:
        model.manager.shutdown()


def test_sequence_classifier_trains_locally(swarm: str, steerable_dir: Path) -> None:
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(steerable_dir), initial_peers=[swarm], dht_prefix=STEERABLE, num_labels=2,
        tuning_mode="ptune", pre_seq_len=2,
    )  # fmt: skip
    try:
        inputs = ids(8, 5, seed=5)
        labels = torch.tensor([0, 1] * 4)
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.score.weight.requires_grad_(True)
        optimizer = torch.optim.Adam([*trainable, model.score.weight], lr=0.05)
        losses = []
        for _ in range(20):
            loss = model(input_ids=inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert model(input_ids=inputs).logits.shape == (8, 2)
        assert losses[-1] <= losses[0] / 2, losses
    finally:
        model.manager.shutdown()
