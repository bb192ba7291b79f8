"""Structured output: OpenAI's ``response_format`` as a grammar that decoding must follow.

``json_object`` and ``json_schema`` become a JSON grammar compiled by llguidance (the Rust library
behind vLLM's and SGLang's structured output). It was chosen over xgrammar and outlines-core
because it computes token masks lazily, per step, in well under a millisecond, with no
precomputation over the vocabulary and no compiler at run time (xgrammar's CPU mask kernel and
llguidance's own torch helper go through ``torch.compile``), and because it has no dependencies.
Each step, ``GrammarConstraint`` feeds the matcher the token just generated and leaves only the
tokens the grammar allows (the end-of-sequence token once the JSON value is complete), so the
answer always parses and matches the schema, unless ``max_tokens`` cuts it short
(``finish_reason: "length"``, as OpenAI's)."""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import LogitsProcessor

from corolla.api.errors import InvalidRequest

# JSON laid out as json.dumps does ({"a": 1, "b": [2, 3]}): free whitespace lets a model wander off
# into endless newlines and spaces, which then fill max_tokens instead of the value
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar ``response_format`` asks for; ``None`` for plain text. A format this
    server cannot follow, or a schema llguidance refuses, is the request's fault (400)."""
    import llguidance

    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema") if response_format else None
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest(
                "response_format.json_schema: give {'name': ..., 'schema': {...}}", param="response_format"
            )
        schema = spec.get("schema", {})
    else:
        raise InvalidRequest(
            f"response_format.type: {kind!r} is not supported (text, json_object, json_schema)",
            param="response_format",
        )
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_LAYOUT)
    except ValueError as e:
        raise InvalidRequest(f"response_format: {e}", param="response_format") from None
    if error := llguidance.LLMatcher.validate_grammar(grammar):
        message = f"response_format: the schema cannot be followed: {error}"
        raise InvalidRequest(message, param="response_format")
    return grammar


class GrammarConstraint(LogitsProcessor):
    """Leaves only the tokens ``grammar`` allows next (one generation's own matcher)."""

    def __init__(self, tokenizer: Any, grammar: str, prompt_tokens: int) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.prompt_tokens = prompt_tokens  # input_ids start with the prompt; the rest is ours
        self.consumed = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[0, self.prompt_tokens + self.consumed :].tolist()
        if new:
            self.matcher.consume_tokens(new)
            self.consumed += len(new)
        if self.matcher.is_error():  # only if a token it forbade came through: a bug, not the request's
            raise RuntimeError(f"structured output left its grammar: {self.matcher.get_error()}")
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        n = min(scores.shape[-1], allowed.numel())
        masked = torch.full_like(scores, float("-inf"))
        masked[:, :n] = scores[:, :n].masked_fill(~allowed[:n], float("-inf"))
        return masked  # type: ignore[return-value]


def llguidance_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> Any:
    """llguidance's view of a (fast) transformers tokenizer; about half a second, so built once."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos_ids or None)
