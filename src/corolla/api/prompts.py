"""Prompts -> token ids: chat conversations through the tokenizer's chat template, plain text as is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corolla.api.tools import prompt_messages, template_knows_tools

Message = dict[str, Any]  # {"role", "content"}, and "tool_calls" / "tool_call_id" (tools.py)
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def chat_text(tokenizer: Any, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as the model expects it, ending where the assistant's answer begins: the
    tokenizer's chat template when it has one, else one ``Role: content`` line per message. Tool
    calls, their results and the ``tools`` offered are written as ``tools.py`` says."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    messages, native_tools = prompt_messages(
        list(messages), tools, native=has_template and template_knows_tools(tokenizer)
    )
    if has_template:
        extra = {} if native_tools is None else {"tools": native_tools}
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        )
    lines = [f"{ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n".join([*lines, f"{ROLE_NAMES['assistant']}:"])


def encode_chat(
    tokenizer: Any, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of a chat prompt. A template writes its own special tokens (BOS…), so none are
    added; without a template the text is encoded like a plain prompt."""
    text = chat_text(tokenizer, messages, tools)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not has_template).input_ids)


def encode_text(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a plain-text prompt (with the tokenizer's usual special tokens)."""
    return list(tokenizer(prompt).input_ids)
