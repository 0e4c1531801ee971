"""The OpenAPI documents of both listeners, generated from the apps themselves.

``make openapi`` writes them to ``openapi/``; a test fails when the committed files
drift from what this module generates.

FastAPI's raw schema is corrected to what the service really answers and completed for
client generators, by rules that apply to every operation (a new route needs nothing
here):

- no 422 (every validation failure is ``400 invalid_request``);
- ``servers`` (the default listener address) and a tag per resource, taken from the path
  (``/api/v1/<listener>/<resource>/…``), so generated clients get one module per resource;
- every response refers to the ``X-Request-ID`` and ``Cache-Control`` headers, a 401 to
  ``WWW-Authenticate`` and a 429 to ``Retry-After``;
- ``ErrorDetail.code`` is an enum of every code the service can answer with; each error
  response describes its codes and has an example body per code;
- a success response is described by its schema's description, not "Successful
  Response"; request and response bodies get an example assembled from the field
  examples; docstring markup (RST double backticks, roles) becomes Markdown.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from authsession.domain import errors as domain_errors
from authsession.http.common import (
    ERROR_CODES_KEY,
    REQUEST_ID_HEADER_DOC,
    SESSION_TOKEN_SCHEME,
    error_codes,
)

# Error codes the HTTP layer produces itself, beside the domain errors' (which are read
# from authsession.domain.errors): code → (meaning, message as sent).
HTTP_LAYER_CODES: dict[str, tuple[str, str]] = {
    "not_found": ("No such route.", "no such route"),
    "method_not_allowed": ("The route exists, but not with this method.", "method not allowed"),
    "payload_too_large": (
        "The request body exceeds 16 KiB.",
        "the request body exceeds 16 KiB",
    ),
    "http_error": (
        "Any other refusal of the HTTP layer (not expected in normal operation).",
        "bad request",
    ),
}

# ``details`` of the example bodies, where a code has them.
DETAILS_EXAMPLES: dict[str, dict[str, Any]] = {
    "invalid_code": {"attempts_remaining": 4},
    "invalid_request": {"problems": [{"location": "body.email", "problem": "Field required"}]},
}

TAG_DESCRIPTIONS = {
    "auth": "Passwordless e-mail login: mail a code, confirm it, get a device session.",
    "sessions": "One device session, by its id: read, revoke, extend.",
    "users": "Everything about one user: list or revoke their sessions, block them.",
}

# Path parameters by name, wherever they appear.
PARAMETER_DOCS: dict[str, dict[str, Any]] = {
    "user_id": {
        "description": "The user service's id of the user",
        "example": "usr_8c1f4e2b9a7d6c5e3f1a0b9c8d7e6f5a",
    },
    "device_session_id": {
        "description": "Opaque id of the device session",
        "example": "dS7hG2kLp9QwXz4mNc8vBt1yRf6aJe3u",
    },
    "status": {"description": "Which sessions to list (default all)", "example": "active"},
}

CONVENTIONS = """

Conventions of every operation: request and response bodies are JSON; unknown fields \
are rejected. Every error answer has the body `ErrorResponse` and a stable \
`error.code`; every validation failure is `400 invalid_request` (never 422); a body over \
16 KiB is `413 payload_too_large`; a Redis, user-service or mail-service failure is \
`503 service_unavailable`. Every response carries `X-Request-ID` and \
`Cache-Control: no-store`. Timestamps are RFC 3339 in UTC with a `Z` suffix. New error \
codes and new optional response fields may be added without a new API version."""

ERROR_HEADERS: dict[str, dict[str, Any]] = {
    "401": {
        "WWW-Authenticate": {
            "description": "Bearer: the scheme the credentials must use",
            "required": True,
            "schema": {"type": "string", "example": "Bearer"},
        }
    },
    "429": {
        "Retry-After": {
            "description": "With rate_limited: seconds until this client's window ends "
            "and a new request may succeed",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "example": 30},
        }
    },
}

_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def error_catalogue() -> dict[str, tuple[str, str]]:
    """Every error code the service answers with: code → (meaning, default message)."""
    found: dict[str, tuple[str, str]] = {}
    pending: list[type[domain_errors.AuthSessionError]] = [domain_errors.AuthSessionError]
    while pending:
        cls = pending.pop(0)
        doc = inspect.getdoc(cls) or ""
        meaning = doc.split("\n\n")[0].replace("\n", " ").strip()
        if cls is domain_errors.AuthSessionError:
            meaning = "An unexpected failure; the body gives no detail."
        found.setdefault(cls.code, (markdown(meaning), cls.default_message))
        pending.extend(cls.__subclasses__())
    for code, entry in HTTP_LAYER_CODES.items():
        found.setdefault(code, entry)
    return found


def markdown(text: str) -> str:
    """Docstring markup to CommonMark: ``x`` and :role:`x` become `x`."""
    return _RST_ROLE.sub(r"`\1`", _RST_LITERAL.sub(r"`\1`", text)).replace("::", ":")


def tag_of(path: str) -> str | None:
    """``/api/v1/<listener>/<resource>/…`` → ``<resource>``."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 4 and parts[0] == "api" and not parts[3].startswith("{"):
        return parts[3]
    return None


def contract_openapi(
    app: FastAPI, *, bearer: bool = False, servers: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """The app's schema, corrected to what the service really answers (module docstring)."""
    schema = copy.deepcopy(app.openapi())
    info = schema.setdefault("info", {})
    info["description"] = info.get("description", "") + CONVENTIONS
    if servers:
        schema["servers"] = servers
    components = schema.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    catalogue = error_catalogue()
    _error_code_enum(schemas, catalogue)
    headers: dict[str, Any] = {}
    tags: list[str] = []
    for path, path_item in schema.get("paths", {}).items():
        for method, operation in path_item.items():
            if method not in _METHODS:
                continue
            tag = tag_of(path)
            if tag is not None and not operation.get("tags"):
                operation["tags"] = [tag]
            for name in operation.get("tags", []):
                if name not in tags:
                    tags.append(name)
            _document_parameters(operation)
            _document_request_body(operation, schemas)
            _document_responses(operation, schemas, catalogue, headers)
            if bearer:
                operation["security"] = [{"bearerAuth": []}, {}]
    if tags:
        schema["tags"] = [
            {"name": name, **({"description": d} if (d := TAG_DESCRIPTIONS.get(name)) else {})}
            for name in tags
        ]
        # Keep the document's key order readable: tags right after servers.
        schema = _reorder(schema, ["openapi", "info", "servers", "tags", "paths", "components"])
    components["headers"] = headers
    if _uses_scheme(schema, SESSION_TOKEN_SCHEME):
        components.setdefault("securitySchemes", {})[SESSION_TOKEN_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "The `session_token` that confirm returned.",
        }
    if bearer:
        components.setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "Required on every request when AUTHSESSION_INTERNAL_API_TOKEN "
            "is set; otherwise the listener trusts its network.",
        }
    _clean_markup(schema)
    return schema


def _uses_scheme(schema: dict[str, Any], name: str) -> bool:
    return any(
        name in requirement
        for path_item in schema.get("paths", {}).values()
        for method, operation in path_item.items()
        if method in _METHODS
        for requirement in operation.get("security", [])
    )


def _reorder(document: dict[str, Any], order: list[str]) -> dict[str, Any]:
    head = {key: document[key] for key in order if key in document}
    return {**head, **{k: v for k, v in document.items() if k not in head}}


def _error_code_enum(schemas: dict[str, Any], catalogue: dict[str, tuple[str, str]]) -> None:
    detail = schemas.get("ErrorDetail")
    if detail is None:
        return
    detail["properties"]["code"]["enum"] = sorted(catalogue)


def _document_parameters(operation: dict[str, Any]) -> None:
    for parameter in operation.get("parameters", []):
        for key, value in PARAMETER_DOCS.get(parameter.get("name", ""), {}).items():
            parameter.setdefault(key, value)


def _document_request_body(operation: dict[str, Any], schemas: dict[str, Any]) -> None:
    body = operation.get("requestBody")
    if body is None:
        return
    for media in body.get("content", {}).values():
        target = _component(media.get("schema", {}), schemas)
        if target is None:
            continue
        name, component = target
        if "description" in component:
            body.setdefault("description", component["description"])
        example = example_of({"$ref": f"#/components/schemas/{name}"}, schemas)
        if example is not None:
            media.setdefault("example", example)


def _document_responses(
    operation: dict[str, Any],
    schemas: dict[str, Any],
    catalogue: dict[str, tuple[str, str]],
    headers: dict[str, Any],
) -> None:
    responses: dict[str, Any] = operation.get("responses", {})
    responses.pop("422", None)
    for status, response in responses.items():
        own = dict(REQUEST_ID_HEADER_DOC)
        own.update(ERROR_HEADERS.get(status, {}))
        refs = response.setdefault("headers", {})
        for name, doc in own.items():
            headers.setdefault(name, copy.deepcopy(doc))
            refs[name] = {"$ref": f"#/components/headers/{name}"}
        if int(status) >= 400:
            _document_error(response, catalogue)
        else:
            _document_success(operation, response, schemas)


def _document_success(
    operation: dict[str, Any], response: dict[str, Any], schemas: dict[str, Any]
) -> None:
    for media in response.get("content", {}).values():
        target = _component(media.get("schema", {}), schemas)
        if target is None:
            continue
        name, component = target
        if response.get("description") in (None, "", "Successful Response"):
            response["description"] = component.get("description") or operation.get("summary", "OK")
        example = example_of({"$ref": f"#/components/schemas/{name}"}, schemas)
        if example is not None:
            media.setdefault("example", example)
    if response.get("description") == "Successful Response":
        response["description"] = operation.get("summary", "OK")


def _document_error(response: dict[str, Any], catalogue: dict[str, tuple[str, str]]) -> None:
    listed = response.pop(ERROR_CODES_KEY, None)
    if listed is None:
        listed = error_codes(str(response.get("description", "")))
    lines = []
    examples: dict[str, Any] = {}
    for entry in listed:
        code = entry["code"]
        if code not in catalogue:
            raise ValueError(f"error code {code!r} is not one the service can answer with")
        meaning, message = catalogue[code]
        note = f" ({entry['note']})" if entry.get("note") else ""
        lines.append(f"- `{code}`: {meaning.rstrip('.')}{note}.")
        error: dict[str, Any] = {"code": code, "message": message}
        if code in DETAILS_EXAMPLES:
            error["details"] = copy.deepcopy(DETAILS_EXAMPLES[code])
        examples[code] = {"summary": meaning.rstrip("."), "value": {"error": error}}
    response["description"] = "\n".join(lines)
    for media in response.get("content", {}).values():
        media["examples"] = examples


def _component(
    schema: dict[str, Any], schemas: dict[str, Any]
) -> tuple[str, dict[str, Any]] | None:
    """The component a body schema refers to (directly, or as the non-null ``anyOf``)."""
    refs = [o for o in schema.get("anyOf", []) if "$ref" in o]
    if "$ref" not in schema and len(refs) == 1:
        schema = refs[0]
    ref = schema.get("$ref", "")
    name = ref.rpartition("/")[2]
    if not ref.startswith("#/components/schemas/") or name not in schemas:
        return None
    return name, schemas[name]


def example_of(schema: dict[str, Any], schemas: dict[str, Any], depth: int = 0) -> Any:
    """An example value assembled from the ``examples`` of a schema and its properties."""
    if depth > 8:
        return None
    target = _component(schema, schemas)
    if target is not None:
        return example_of(target[1], schemas, depth + 1)
    if schema.get("examples"):
        return schema["examples"][0]
    if "example" in schema:
        return schema["example"]
    if schema.get("type") == "object" or "properties" in schema:
        out = {}
        for name, prop in schema.get("properties", {}).items():
            value = example_of(prop, schemas, depth + 1)
            if value is not None or name in schema.get("required", []):
                out[name] = value
        return out
    if schema.get("type") == "array":
        item = example_of(schema.get("items", {}), schemas, depth + 1)
        return [] if item is None else [item]
    for option in schema.get("anyOf", []):
        if option.get("type") != "null":
            value = example_of(option, schemas, depth + 1)
            if value is not None:
                return value
    if "enum" in schema:
        return schema["enum"][0]
    return None


def _clean_markup(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("description", "summary") and isinstance(value, str):
                node[key] = markdown(value)
            else:
                _clean_markup(value)
    elif isinstance(node, list):
        for item in node:
            _clean_markup(item)


def generate() -> dict[str, dict[str, Any]]:
    """Both documents, keyed by file name."""
    from authsession.http.internal import create_internal_app
    from authsession.http.public import create_public_app
    from authsession.settings import MEMORY_STORE, ListenAddress, Settings
    from authsession.wiring import build_core

    # The stub and memory:// warnings of building a core are noise here; the level is put
    # back afterwards so that generating (as a test does) leaves logging as it was.
    logger = logging.getLogger("authsession")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        core = build_core(Settings(REDIS_ADDR=MEMORY_STORE))
    finally:
        logger.setLevel(level)

    def default_port(field: str) -> int:
        # The variables' defaults, whatever this environment sets.
        address: ListenAddress = Settings.model_fields[field].default
        return address.port

    def server(name: str, variable: str, port: int) -> list[dict[str, str]]:
        return [
            {
                "url": f"http://localhost:{port}",
                "description": f"The {name} listener at its default address ({variable}); "
                "in production, the address of your proxy or service mesh",
            }
        ]

    return {
        "public.yaml": contract_openapi(
            create_public_app(core),
            servers=server(
                "public", "AUTHSESSION_PUBLIC_HTTP_ADDR", default_port("PUBLIC_HTTP_ADDR")
            ),
        ),
        "internal.yaml": contract_openapi(
            create_internal_app(core),
            bearer=True,
            servers=server(
                "internal", "AUTHSESSION_INTERNAL_HTTP_ADDR", default_port("INTERNAL_HTTP_ADDR")
            ),
        ),
    }


def render(document: dict[str, Any]) -> str:
    """Stable YAML text of one document (no anchors: some tools do not resolve them)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    text = yaml.dump(document, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)
    return str(text)


def main(argv: list[str]) -> int:
    """``python -m authsession.http.openapi DIR``: write both documents into DIR."""
    target = Path(argv[1] if len(argv) > 1 else "openapi")
    target.mkdir(parents=True, exist_ok=True)
    for name, document in generate().items():
        (target / name).write_text(render(document), encoding="utf-8")
        print(f"wrote {target / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
