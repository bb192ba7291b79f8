"""Tool calling in OpenAI's shape, for any chat model (pure functions).

How a request with ``tools`` is served:

- **The prompt.** A chat template that knows tools (it mentions ``tools``) gets them as
  transformers' ``apply_chat_template(..., tools=...)`` expects, with earlier calls and their
  results as messages of its own kind. A template that does not (the built-in model's) gets a
  system message that lists the tools and asks for a call as one JSON object
  ``{"name": ..., "arguments": {...}}``; earlier calls are narrated by the assistant
  (``I called get_weather({"city": "Paris"}).``) and their results come as user messages
  (``get_weather returned: ...``). Shown in the JSON form, small models copied the call again
  instead of answering from its result.
- **The answer.** ``tool_choice`` ``"required"`` or a named function constrains decoding to such a
  JSON object of the allowed tools' schemas (``constrained.py``), so it always is a valid call.
  ``"auto"`` lets the model choose: an answer that is such an object (bare, in a ```json fence, or
  in ``<tool_call>`` tags, as several model families write it) naming a given tool is a call;
  anything else is text. ``"none"`` leaves the tools out of the prompt: a text answer.
- **The response.** A call comes back as ``message.tool_calls`` (``finish_reason: "tool_calls"``,
  ``content: null``), one call per answer; streamed, as one ``tool_calls`` delta at the end.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

CALL_INSTRUCTIONS = (
    "You can call the following tools. To call one, answer with nothing but a JSON object of the "
    'form {{"name": <tool name>, "arguments": <its arguments>}}; otherwise answer normally. Once a '
    "tool's result is given, answer the user from it instead of calling the tool again.\n"
    "Tools:\n{tools}"
)
# a template without tools sees earlier calls and their results as plain turns, narrated: shown as
# the JSON it is asked to call with, small models copy that turn instead of answering from the result
CALL_TEMPLATE = "I called {name}({arguments})."
RESULT_TEMPLATE = "{name} returned: {content}"
_WRAPPED = re.compile(  # a bare JSON object, or one in a ```json fence or in <tool_call> tags
    r"^\s*(?:<tool_call>\s*(.*?)\s*</tool_call>|```(?:json)?\s*(.*?)\s*```|(\{.*\}))\s*$", re.S
)


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: a given tool's name and its arguments (as a JSON string, as
    OpenAI sends them)."""

    id: str
    name: str
    arguments: str

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments},
        }  # fmt: skip
        return call if index is None else {"index": index, **call}


def functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each tool's ``function`` by name (the request's ``tools``, already validated)."""
    return {tool["function"]["name"]: tool["function"] for tool in tools}


def allowed_names(tools: list[dict[str, Any]], tool_choice: Any) -> list[str]:
    """The tools a call may name: all of them, or the one ``tool_choice`` names."""
    if isinstance(tool_choice, dict):
        return [tool_choice["function"]["name"]]
    return list(functions(tools))


def call_schema(tools: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """A JSON schema of one call of one of ``names``: ``{"name": ..., "arguments": {...}}``."""
    by_name = functions(tools)
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "arguments": by_name[name].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in names
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse_call(text: str, tools: list[dict[str, Any]], names: list[str]) -> ToolCall | None:
    """The call ``text`` makes, if it is one (see the module's docstring); else ``None``."""
    match = _WRAPPED.match(text)
    if match is None:
        return None
    try:
        value = json.loads(next(group for group in match.groups() if group is not None))
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(arguments, ensure_ascii=False))


def template_knows_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def prompt_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation (OpenAI's messages, tool calls and results included) as a chat template
    takes it, and the tools to hand the template: its own way when it knows tools (``native``),
    else in plain messages (see the module's docstring)."""
    if native:
        return [_native(m) for m in messages], tools
    names = {}  # call id -> tool name, to say which call a result answers
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            names.update({call["id"]: call["function"]["name"] for call in calls})
            text = " ".join(
                CALL_TEMPLATE.format(
                    name=c["function"]["name"], arguments=json.dumps(_arguments(c), ensure_ascii=False)
                )
                for c in calls
            )
            out.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            call_id = message.get("tool_call_id", "")
            content = RESULT_TEMPLATE.format(name=names.get(call_id, "the tool"), content=message["content"])
            out.append({"role": "user", "content": content})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if tools:
        listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
        instructions = CALL_INSTRUCTIONS.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out, None


def _arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as a value (OpenAI sends them as a JSON string)."""
    arguments = call["function"].get("arguments", "{}")
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return arguments


def _native(message: dict[str, Any]) -> dict[str, Any]:
    """A message as transformers' tool-aware templates take it (arguments as values)."""
    if message["role"] == "assistant" and message.get("tool_calls"):
        calls = [  # fmt: skip
            {
                "type": "function",
                "id": c["id"],
                "function": {"name": c["function"]["name"], "arguments": _arguments(c)},
            }
            for c in message["tool_calls"]
        ]
        return {"role": "assistant", "content": message.get("content") or "", "tool_calls": calls}
    return message
