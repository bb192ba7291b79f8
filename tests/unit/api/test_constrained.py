"""Structured output: response_format -> grammar, and decoding that always follows it (random logits
stand in for the model, so every path of the grammar gets exercised)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from corolla.api.constrained import GrammarConstraint, grammar_for, llguidance_tokenizer
from corolla.api.errors import InvalidRequest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The built-in model's tokenizer (49152 tokens; converted once, then cached)."""
    from transformers import AutoTokenizer

    from corolla.config import BUILTIN_MODEL, default_cache_dir
    from corolla.models.resolve import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(BUILTIN_MODEL, default_cache_dir()).path)


def decode_under(grammar: str, tokenizer: Any, seed: int, max_tokens: int = 200) -> tuple[str, bool]:
    """Sample from random logits under the grammar until it ends (EOS) or ``max_tokens``: the text,
    and whether it ended."""
    vocab = len(tokenizer)
    ll_tokenizer = llguidance_tokenizer(tokenizer, vocab, [tokenizer.eos_token_id])
    constraint = GrammarConstraint(ll_tokenizer, grammar, 1)
    generator = torch.Generator().manual_seed(seed)
    ids = [0]
    for _ in range(max_tokens):
        logits = torch.randn(1, vocab, generator=generator) * 3
        scores = constraint(torch.tensor([ids]), logits)  # type: ignore[arg-type]
        token = int(torch.multinomial(torch.softmax(scores[0], dim=-1), 1, generator=generator))
        if token == tokenizer.eos_token_id:
            return tokenizer.decode(ids[1:]), True
        ids.append(token)
    return tokenizer.decode(ids[1:]), False


def test_text_is_no_grammar_and_json_formats_are() -> None:
    assert grammar_for(None) is None and grammar_for({"type": "text"}) is None
    assert grammar_for({"type": "json_object"}) is not None
    assert grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}) is not None


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "yaml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
    ],
)
def test_formats_it_cannot_follow_are_400_naming_response_format(response_format: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        grammar_for(response_format)
    assert caught.value.param == "response_format" and "response_format" in str(caught.value)


def test_decoding_under_a_schema_always_gives_a_matching_object(tokenizer: Any) -> None:
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert grammar is not None
    for seed in range(10):
        text, ended = decode_under(grammar, tokenizer, seed)
        assert ended, text  # bounded strings, fixed layout: it cannot go on
        value = json.loads(text)
        assert text == json.dumps(value, ensure_ascii=False)  # laid out as json.dumps does
        assert set(value) == {"name", "age", "pet"} and len(value["name"]) <= 8
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
        assert value["pet"] in ("cat", "dog", "none")


def test_json_object_decoding_always_parses_to_an_object(tokenizer: Any) -> None:
    """Random logits rarely close a free string, so not every run ends; every one that ends parses,
    and whatever did not end is still the start of a JSON object."""
    grammar = grammar_for({"type": "json_object"})
    assert grammar is not None
    ended = 0
    for seed in range(10):
        text, done = decode_under(grammar, tokenizer, seed, max_tokens=100)
        if done:
            ended += 1
            assert isinstance(json.loads(text), dict), text
        else:
            assert text.startswith("{")
    assert ended >= 1  # (seeded: the same runs every time)
