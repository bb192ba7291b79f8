"""Prompts -> token ids: chat conversations through the tokenizer's chat template, plain text as is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def chat_text(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The conversation as the model expects it, ending where the assistant's answer begins: the
    tokenizer's chat template when it has one, else one ``Role: content`` line per message."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
    lines = [f"{ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n".join([*lines, f"{ROLE_NAMES['assistant']}:"])


def encode_chat(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of a chat prompt. A template writes its own special tokens (BOS…), so none are
    added; without a template the text is encoded like a plain prompt."""
    text = chat_text(tokenizer, messages)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not has_template).input_ids)


def encode_text(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a plain-text prompt (with the tokenizer's usual special tokens)."""
    return list(tokenizer(prompt).input_ids)
