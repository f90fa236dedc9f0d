"""Tools for the local model: OpenAI's `tools` and `tool_choice`, rendered into the prompt, a call constrained by a
grammar when one is required, and the answer read back as `tool_calls`.

A call is the JSON object `{"name": ..., "arguments": {...}}`. When the chat template renders tools itself (its
text names `tools`), they go to it; otherwise a system message lists them and says how to call one. With
`tool_choice` `required` or a named function, a grammar built from the functions' parameter schemas leaves the
model no other answer; with `auto`, an answer that is such an object naming one of the tools is the call.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import orjson
from llama_cpp.llama_grammar import json_schema_to_gbnf

from app.errors import InvalidRequest

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools ask of the generation: the functions offered, and the grammar a required call
    follows (None with `auto`: the model may answer in words)."""

    names: tuple[str, ...]
    grammar: str | None


def plan_tools(payload: dict[str, Any]) -> ToolPlan | None:
    """The request's tools, checked (400 naming `tools` or `tool_choice`); None when it offers none or `none`."""
    tools, choice = payload.get("tools"), payload.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    functions = _functions(tools)
    if choice is None or choice == "auto":
        return ToolPlan(tuple(functions), None)
    if choice == "none":
        return None
    if choice == "required":
        chosen = functions
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not one of the tools", param="tool_choice")
        chosen = {name: functions[name]}
    else:
        raise InvalidRequest(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    return ToolPlan(tuple(functions), _call_grammar(chosen))


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    """Each function's parameters schema, by name."""
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("tools must be a non-empty list of functions", param="tools")
    functions: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name or name in functions:
            raise InvalidRequest(
                "each tool is {'type': 'function', 'function': {'name': ..., 'parameters': {...}}}, names unique",
                param="tools",
            )
        parameters = function.get("parameters", _ANY_OBJECT) if isinstance(function, dict) else _ANY_OBJECT
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"the parameters of {name!r} must be a JSON schema object", param="tools")
        functions[name] = parameters
    return functions


def _call_grammar(functions: dict[str, dict[str, Any]]) -> str:
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters or _ANY_OBJECT},
                "required": ["name", "arguments"],
            }
            for name, parameters in functions.items()
        ]
    }
    try:
        grammar: str = json_schema_to_gbnf(orjson.dumps(schema).decode())
    except Exception as exc:  # the converter raises whatever it meets: all of it is the client's schema
        raise InvalidRequest(f"a tool's parameters schema cannot be used: {exc}", param="tools") from None
    return grammar


def render_messages(payload: dict[str, Any], template_renders_tools: bool) -> list[Any]:
    """The messages as the chat template takes them: assistant calls and tool results as text, and (for a
    template that does not render tools) a system message that lists the tools."""
    messages = [_as_text(message) for message in payload["messages"]]
    tools, choice = payload.get("tools"), payload.get("tool_choice")
    if tools is None or choice == "none" or template_renders_tools:
        return messages
    listed = "\n".join(
        orjson.dumps(
            {key: tool["function"][key] for key in ("name", "description", "parameters") if key in tool["function"]}
        ).decode()
        for tool in tools
    )
    if choice == "required":
        must = "You must call one of them."
    elif isinstance(choice, dict):
        must = f"You must call {choice['function']['name']}."
    else:
        must = "Call one only if it helps; otherwise answer in words."
    instructions = (
        f"You can call these functions:\n{listed}\nTo call one, answer with only a JSON object "
        f'{{"name": <the function\'s name>, "arguments": <an object of its arguments>}}. {must}'
    )
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{instructions}"}, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


def _as_text(message: Any) -> Any:
    """An assistant message that called tools, as the text of its calls (templates expect a string)."""
    if not isinstance(message, dict) or not message.get("tool_calls") or message.get("content"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments", "{}")
        try:
            parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
        except orjson.JSONDecodeError:
            parsed = arguments
        calls.append(orjson.dumps({"name": function.get("name"), "arguments": parsed}).decode())
    return {**message, "content": "\n".join(calls)}


def read_call(text: str, plan: ToolPlan) -> dict[str, Any] | None:
    """The answer as OpenAI's tool call, if it is one: a JSON object naming one of the tools, with arguments."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        value = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return None
    if (
        not isinstance(value, dict)
        or value.get("name") not in plan.names
        or not isinstance(value.get("arguments"), dict)
    ):
        return None
    return {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {"name": value["name"], "arguments": orjson.dumps(value["arguments"]).decode()},
    }
