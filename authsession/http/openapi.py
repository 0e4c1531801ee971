"""The OpenAPI documents of both listeners, generated from the apps themselves.

``make openapi`` writes them to ``openapi/``; a test fails when the committed files
drift from what this module generates.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from authsession.http.common import REQUEST_ID_HEADER_DOC


def contract_openapi(app: FastAPI, *, bearer: bool = False) -> dict[str, Any]:
    """The app's schema, corrected to what the service really answers.

    FastAPI documents a 422 for every operation with a body or parameters; this service
    answers every validation failure with 400 ``invalid_request`` instead, so the 422s and
    their schemas are removed. Every response documents the headers of CONTRACT §4.
    """
    schema = app.openapi()
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses: dict[str, Any] = operation.get("responses", {})
            responses.pop("422", None)
            for response in responses.values():
                response.setdefault("headers", {}).update(copy.deepcopy(REQUEST_ID_HEADER_DOC))
            if bearer:
                operation["security"] = [{"bearerAuth": []}, {}]
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if bearer:
        components["securitySchemes"] = {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "Required on every request when AUTHSESSION_INTERNAL_API_TOKEN "
                "is set; otherwise the listener trusts its network.",
            }
        }
    return schema


def generate() -> dict[str, dict[str, Any]]:
    """Both documents, keyed by file name."""
    from authsession.http.internal import create_internal_app
    from authsession.http.public import create_public_app
    from authsession.settings import Settings
    from authsession.wiring import build_core

    logging.getLogger("authsession").setLevel(logging.ERROR)
    core = build_core(Settings(REDIS_ADDR="memory://"))
    return {
        "public.yaml": contract_openapi(create_public_app(core)),
        "internal.yaml": contract_openapi(create_internal_app(core), bearer=True),
    }


def render(document: dict[str, Any]) -> str:
    """Stable YAML text of one document."""
    import yaml

    return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100))


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
