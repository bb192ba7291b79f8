"""Chat prompts: the tokenizer's template for whole conversations, a plain format without one."""

from __future__ import annotations

from typing import Any

from corolla.api.prompts import chat_text, encode_chat, encode_text

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
]


class _Encoding:
    def __init__(self, ids: list[int]) -> None:
        self.input_ids = ids


class TemplateTokenizer:
    """Renders like a ChatML template; records how it was called."""

    chat_template = "{{ chatml }}"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        self.calls.append({"messages": messages, **kwargs})
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + ("<|im_start|>assistant\n" if kwargs.get("add_generation_prompt") else "")

    def __call__(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        self.calls.append({"text": text, "add_special_tokens": add_special_tokens})
        return _Encoding([0] * add_special_tokens + [ord(c) for c in text])


class PlainTokenizer(TemplateTokenizer):
    chat_template = None


def test_a_template_renders_the_whole_conversation_ending_with_the_assistants_turn() -> None:
    tokenizer = TemplateTokenizer()
    text = chat_text(tokenizer, CONVERSATION)
    assert tokenizer.calls[0] == {"messages": CONVERSATION, "tokenize": False, "add_generation_prompt": True}
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "<|im_start|>assistant\nHello!<|im_end|>\n" in text
    assert text.endswith("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_templated_prompts_get_no_extra_special_tokens() -> None:
    tokenizer = TemplateTokenizer()
    ids = encode_chat(tokenizer, CONVERSATION[1:2])
    assert ids == [ord(c) for c in "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    assert tokenizer.calls[-1]["add_special_tokens"] is False


def test_without_a_template_one_line_per_message() -> None:
    tokenizer = PlainTokenizer()
    assert chat_text(tokenizer, CONVERSATION) == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Capital of France?\nAssistant:"
    )
    assert encode_chat(tokenizer, CONVERSATION[1:2])[0] == 0  # the tokenizer's own special tokens


def test_plain_text_prompts_keep_the_tokenizers_special_tokens() -> None:
    assert encode_text(PlainTokenizer(), "ab") == [0, ord("a"), ord("b")]
