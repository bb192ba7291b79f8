"""A LoRA adapter (PEFT format, random and nonzero) served by two servers with ``--adapters``:
the swarm with ``active_adapter`` matches local transformers + peft, without it the base model,
and an adapter no server has is refused with a clear error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.client.transport import call_forward, call_info
from corolla.errors import BadRequest, MissingBlocks
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all

NUM_BLOCKS = 6  # tiny_gqa_dir
PREFIX = "lora"


@pytest.fixture(scope="module")
def adapter_dir(tiny_gqa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(tiny_gqa_dir, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    path = tmp_path_factory.mktemp("lora")
    get_peft_model(base, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def swarm(
    tiny_gqa_dir: Path, adapter_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    servers = start_swarm(
        str(tiny_gqa_dir), [(0, 3), (3, NUM_BLOCKS)], initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", PREFIX, "--adapters", str(adapter_dir)],
        log_dir=tmp_path_factory.mktemp("lora-logs"),
    )  # fmt: skip
    yield dht_peer.maddr or ""
    stop_all(servers)


@pytest.fixture(scope="module")
def local_peft(tiny_gqa_dir: Path, adapter_dir: Path):  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gqa_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def client(path: Path, peer: str, **kwargs: object):  # type: ignore[no-untyped-def]
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=[peer], dht_prefix=PREFIX, **kwargs
    )


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def test_adapter_logits_and_tokens_match_local_peft(
    swarm: str, tiny_gqa_dir: Path, adapter_dir: Path, local_peft, local_model  # type: ignore[no-untyped-def]
) -> None:
    model = client(tiny_gqa_dir, swarm, active_adapter=str(adapter_dir))
    try:
        assert {s.info.adapters for s in model.manager.spans()} == {(str(adapter_dir),)}
        ids = prompt(12, seed=1)
        with torch.no_grad():
            got, expected = model(ids).logits, local_peft(ids).logits
            assert (got - expected).abs().max().item() <= 1e-4
            assert (expected - local_model(ids).logits).abs().max().item() > 1e-2  # the adapter matters
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
            assert torch.equal(tokens, local_peft.generate(input_ids=ids, max_new_tokens=8, do_sample=False))
    finally:
        model.manager.shutdown()


def test_without_an_adapter_the_servers_use_the_base_weights(
    swarm: str, tiny_gqa_dir: Path, local_model  # type: ignore[no-untyped-def]
) -> None:
    model = client(tiny_gqa_dir, swarm)
    try:
        ids = prompt(10, seed=2)
        with torch.no_grad():
            assert (model(ids).logits - local_model(ids).logits).abs().max().item() <= 1e-4
    finally:
        model.manager.shutdown()


def test_an_adapter_no_server_has_is_refused(swarm: str, tiny_gqa_dir: Path) -> None:
    from dataclasses import replace

    from corolla.config import ClientConfig

    config = replace(ClientConfig(), max_wait_for_blocks=1.0)
    model = client(tiny_gqa_dir, swarm, active_adapter="someone/missing-lora", client_config=config)
    try:
        with pytest.raises(MissingBlocks, match=r"adapter 'someone/missing-lora'"):
            model(prompt(4, seed=3))
        # a server asked directly for an adapter it does not have says which ones it serves
        manager = model.manager
        manager.adapter = None
        hop = manager.route(0, 3)[0]
        info = manager.loop.run(call_info(manager.p2p, manager.peer(hop)), timeout=30)
        hidden = torch.zeros(1, 2, 64)
        with pytest.raises(BadRequest, match=r"served adapters") as error:
            manager.loop.run(
                call_forward(manager.p2p, manager.peer(hop), 0, 3, hidden, adapter="someone/missing-lora"),
                timeout=30,
            )
        assert info.adapters[0] in str(error.value)
    finally:
        model.manager.shutdown()
