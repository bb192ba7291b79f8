"""Code written for Petals runs on corolla with only its import changed: Petals' module names, the
blocks as a callable sequence, ``generate(None)`` in a session, a session's batch size taken from its
first step, empty steps and ``torch_dtype=``. One two-server swarm of the tiny 6-block Llama; every
result is checked against local transformers (fp32 within 1e-4, greedy tokens identical)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.sequential import RemoteSequential
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all

PREFIX = "petals-api"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def swarm(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    servers = start_swarm(
        str(tiny_gqa_dir),
        [(0, 3), (3, 6)],
        initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", PREFIX],
        log_dir=tmp_path_factory.mktemp("petals-api"),
    )
    try:
        yield dht_peer.maddr or ""
    finally:
        stop_all(servers)


@pytest.fixture(scope="module")
def model(swarm: str, tiny_gqa_dir: Path) -> Iterator[DistributedModelForCausalLM]:
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[swarm], dht_prefix=PREFIX
    )
    yield remote
    remote.manager.shutdown()


def prompt(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def local_hidden_states(local: LlamaForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """What enters block 0, then each block's output, all before the final norm (transformers' own
    last ``hidden_states`` entry is after it, so the norm's input is caught instead)."""
    caught: list[torch.Tensor] = []
    hook = local.model.norm.register_forward_hook(lambda _m, inputs, _out: caught.append(inputs[0]))
    try:
        hidden = local(ids, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    return [*hidden[:-1], caught[0]]


def test_petals_names_are_corolla_modules(model: DistributedModelForCausalLM) -> None:
    body = model.transformer
    assert body is model.model
    assert body.word_embeddings is body.embed_tokens
    assert body.ln_f is body.norm
    assert body.h is body.layers and isinstance(body.h, RemoteSequential)
    assert len(body.h) == 6 and len(body.h[3:7]) == 3 and len(list(body.h)) == 6
    x = torch.randn(1, 2, model.config.hidden_size)
    assert torch.equal(body.word_embeddings_layernorm(x), x)  # Llama has none: an identity, as in Petals
    assert not any(".h." in k or "word_embeddings" in k or "ln_f" in k for k in model.state_dict())


def test_blocks_called_directly_match_local(
    model: DistributedModelForCausalLM, local_model: LlamaForCausalLM
) -> None:
    ids = prompt(7, seed=1)
    h = model.transformer.h
    with torch.no_grad():
        expected = local_hidden_states(local_model, ids)
        out = h(model.transformer.word_embeddings(ids))
        middle = h[1:3](expected[1])
        with h[1:3].inference_session(max_length=8) as session:
            empty = session.step(torch.empty(1, 0, model.config.hidden_size))
            stepped = torch.cat([session.step(expected[1][:, :5]), session.step(expected[1][:, 5:])], dim=1)
    assert (out - expected[6]).abs().max().item() <= TOLERANCE
    assert (middle - expected[3]).abs().max().item() <= TOLERANCE
    assert empty.shape == (1, 0, model.config.hidden_size)
    assert (stepped - expected[3]).abs().max().item() <= TOLERANCE
    assert [(hop.start, hop.end) for hop in session.route] == [(1, 3)]


def test_generate_none_continues_the_session(
    model: DistributedModelForCausalLM, local_model: LlamaForCausalLM
) -> None:
    ids = prompt(6, seed=2)
    with torch.no_grad(), model.inference_session(max_length=16) as session:
        empty = session.step(torch.empty(1, 0, model.config.hidden_size))  # a no-op
        first = model.generate(ids, max_new_tokens=3, do_sample=False)
        more = model.generate(None, max_new_tokens=3, do_sample=False)
    expected = local_model.generate(first, max_new_tokens=3, do_sample=False)
    assert empty.shape == (1, 0, model.config.hidden_size)
    assert more.shape == (1, 3)
    assert torch.equal(more, expected[:, first.shape[1] :])


def test_session_batch_size_comes_from_the_first_step(
    model: DistributedModelForCausalLM, local_model: LlamaForCausalLM
) -> None:
    ids = prompt(5, seed=3, batch=2)
    with torch.no_grad(), model.inference_session(max_length=9) as session:
        got = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert session.batch_size == 2
    for row in range(2):
        expected = local_model.generate(ids[row : row + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(got[row : row + 1], expected)


def test_torch_dtype_is_accepted_without_a_warning(
    swarm: str, tiny_gqa_dir: Path, local_model: LlamaForCausalLM
) -> None:
    logged: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = logged.append  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers warns once per process
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            remote = AutoDistributedModelForCausalLM.from_pretrained(
                str(tiny_gqa_dir), initial_peers=[swarm], dht_prefix=PREFIX, torch_dtype=torch.float32
            )
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    try:
        ids = prompt(5, seed=4)
        with torch.no_grad():
            logits, expected = remote(ids).logits, local_model(ids).logits
    finally:
        remote.manager.shutdown()
    assert not [r for r in logged if "dtype" in r.getMessage()]
    assert not [w for w in warned if "dtype" in str(w.message)]
    assert remote.config.dtype == torch.float32
    assert (logits - expected).abs().max().item() <= TOLERANCE
