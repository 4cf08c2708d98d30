"""The OpenAPI 3.1 document of resillm's own HTTP API (SPEC section 3), served at
``GET /openapi.json``.

The chat request schema is generated from :class:`resillm.schema.ChatCompletionRequest`, and
every error response from :class:`resillm.errors.ErrorBody`, so the document cannot drift
from what the gateway validates and renders. Built once per runtime.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any

import msgspec

from resillm.errors import ErrorBody
from resillm.schema import ChatCompletion, ChatCompletionRequest, ModelList

_REF = "#/components/schemas/{name}"
_JSON = "application/json"


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _json(_ref("ErrorBody"), "an OpenAI-shaped error") for s in statuses}


_OBJECT: dict[str, Any] = {"type": "object"}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


@functools.cache
def openapi_document() -> bytes:
    """The document as JSON bytes; built on first use, then shared."""
    try:
        version = metadata.version("resillm")
    except metadata.PackageNotFoundError:
        version = "0"
    return build_openapi(version)


def build_openapi(version: str) -> bytes:
    """The document as JSON bytes."""
    (request_ref, answer_ref, error_ref, models_ref), components = msgspec.json.schema_components(
        [ChatCompletionRequest, ChatCompletion, ErrorBody, ModelList],
        ref_template=_REF,
    )
    del request_ref, answer_ref, error_ref, models_ref  # the components are named by type
    chat_responses = {
        "200": {
            "description": "a chat completion, or with ``stream`` an SSE stream of chunks",
            "content": {
                _JSON: {"schema": _ref("ChatCompletion")},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        },
        **_errors(400, 401, 403, 404, 408, 413, 429, 502, 503, 504),
    }
    paths: dict[str, Any] = {
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI Chat Completions",
                "security": _BEARER,
                "requestBody": {
                    "required": True,
                    "content": {_JSON: {"schema": _ref("ChatCompletionRequest")}},
                },
                "responses": chat_responses,
            }
        },
        "/v1/models": _get(
            "the model aliases", _json(_ref("ModelList"), "the aliases"), 401, security=True
        ),
        "/v1/budget": _get(
            "budget status for the caller", _json(_OBJECT, "budget windows"), 401, security=True
        ),
        "/health": _get("liveness", _json(_OBJECT, "the process is up")),
        "/ready": {
            "get": {
                "summary": "readiness, with per-target detail",
                "responses": {
                    "200": _json(_OBJECT, "every alias has an available target"),
                    "503": _json(_OBJECT, "some alias has no available target"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text format",
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/admin/config": _admin("get", "the running config, secrets replaced by ***"),
        "/admin/targets": _admin("get", "each target's circuit, failures, latency, in-flight"),
        "/admin/requests": _admin("get", "recent requests, newest first"),
        "/admin/reload": _admin("post", "reload the config now"),
    }
    document = {
        "openapi": "3.1.0",
        "info": {"title": "resillm", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    return msgspec.json.encode(document)


def _get(
    summary: str, ok: dict[str, Any], *statuses: int, security: bool = False
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_errors(*statuses)}}
    if security:
        operation["security"] = _BEARER
    return {"get": operation}


def _admin(method: str, summary: str) -> dict[str, Any]:
    return {
        method: {
            "summary": summary,
            "security": _BEARER,
            "responses": {"200": _json(_OBJECT, summary), **_errors(401, 403, 404)},
        }
    }
