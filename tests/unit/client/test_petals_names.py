"""Every family's client model answers to Petals' names for its modules, built without a swarm (the
blocks' calls through a real swarm are tests/integration/test_petals_api.py's)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn
from transformers import AutoConfig

from corolla.client.model import distributed_class
from corolla.client.remote import Tuning
from corolla.client.sequential import RemoteSequential
from corolla.models.families import SUPPORTED_FAMILIES, family_for
from helpers.models import save_tiny_family


@pytest.mark.parametrize("family_name", SUPPORTED_FAMILIES)
def test_petals_names_are_the_family_modules(family_name: str, tmp_path: Path) -> None:
    path = save_tiny_family(tmp_path, family_name)  # 4 blocks
    config = AutoConfig.from_pretrained(path)
    family = family_for(config)
    manager = SimpleNamespace(num_blocks=4)  # all a model needs of it until it runs blocks
    model = distributed_class(family).from_swarm(path, config, manager, Tuning())  # type: ignore[arg-type]
    body = model.transformer
    blocks = family.layers(model)
    assert body is getattr(model, family.body)
    assert isinstance(blocks, RemoteSequential) and body.h is blocks
    assert [(b.start, b.end) for b in (blocks[1:3], blocks[-1], blocks[2:2])] == [(1, 3), (3, 4), (2, 2)]
    assert body.ln_f is family.final_norm(model)
    if family.style == "gpt2":  # not a Petals family: transformers' names only
        assert not hasattr(body, "word_embeddings")
        return
    assert body.word_embeddings is family.embeddings(model)
    norm = body.word_embeddings_layernorm
    assert isinstance(norm, nn.LayerNorm if family.style == "bloom" else nn.Identity)
    aliases = {name for name, value in vars(type(body)).items() if isinstance(value, property)}
    assert not [k for k in model.state_dict() if set(k.split(".")) & aliases]  # one name per tensor
