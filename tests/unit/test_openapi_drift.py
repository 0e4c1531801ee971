"""The committed OpenAPI documents are exactly what the apps generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from authsession.http.openapi import generate, render

OPENAPI_DIR = Path(__file__).resolve().parents[2] / "openapi"


@pytest.fixture(scope="module")
def generated() -> dict[str, dict[str, object]]:
    return generate()


@pytest.mark.parametrize("name", ["public.yaml", "internal.yaml"])
def test_committed_document_matches_the_code(
    generated: dict[str, dict[str, object]], name: str
) -> None:
    committed = (OPENAPI_DIR / name).read_text(encoding="utf-8")
    assert committed == render(generated[name]), (
        f"openapi/{name} is out of date: run `make openapi` and commit the result"
    )


@pytest.mark.parametrize("name", ["public.yaml", "internal.yaml"])
def test_no_operation_documents_422_and_every_error_uses_the_error_schema(name: str) -> None:
    document = yaml.safe_load((OPENAPI_DIR / name).read_text(encoding="utf-8"))
    for path_item in document["paths"].values():
        for operation in path_item.values():
            responses = operation["responses"]
            assert "422" not in responses
            assert "400" in responses
            assert "503" in responses
            for status, response in responses.items():
                assert "X-Request-ID" in response["headers"]
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}


def test_internal_document_declares_the_optional_bearer_token() -> None:
    document = yaml.safe_load((OPENAPI_DIR / "internal.yaml").read_text(encoding="utf-8"))
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path_item in document["paths"].values():
        for operation in path_item.values():
            assert operation["security"] == [{"bearerAuth": []}, {}]
            assert "401" in operation["responses"]
