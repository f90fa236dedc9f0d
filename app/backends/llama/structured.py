"""Structured output for the local model: OpenAI's response_format as a llama.cpp grammar that constrains
every sampled token, so the answer always parses (and, for a JSON schema, validates)."""

from __future__ import annotations

from typing import Any

import orjson
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from app.errors import InvalidRequest


def grammar_for(response_format: Any) -> str | None:
    """The GBNF grammar `response_format` asks for; None for plain text. 400 for a shape OpenAI does not define
    or a schema that cannot be turned into a grammar."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "response_format json_schema needs a json_schema object with a schema", param="response_format"
            )
        try:
            grammar: str = json_schema_to_gbnf(orjson.dumps(schema).decode())
        except Exception as exc:  # the converter raises whatever it meets: all of it is the client's schema
            raise InvalidRequest(f"the JSON schema cannot be used: {exc}", param="response_format") from None
        return grammar
    raise InvalidRequest(
        "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', ...}",
        param="response_format",
    )
