"""The committed OpenAPI documents are exactly what the apps generate."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml
from pydantic import BaseModel, Field

from authsession.domain import errors as domain_errors
from authsession.http.common import error_codes, errors, new_app
from authsession.http.openapi import contract_openapi, error_catalogue, generate, render
from authsession.http.schemas import Timestamp

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


def test_logout_declares_the_session_token_as_its_bearer() -> None:
    document = yaml.safe_load((OPENAPI_DIR / "public.yaml").read_text(encoding="utf-8"))
    assert document["components"]["securitySchemes"]["sessionToken"]["scheme"] == "bearer"
    secured = {
        path
        for path, path_item in document["paths"].items()
        for operation in path_item.values()
        if operation.get("security")
    }
    assert secured == {"/api/v1/public/auth/logout"}
    logout = document["paths"]["/api/v1/public/auth/logout"]["post"]
    assert logout["security"] == [{"sessionToken": []}]
    assert "internal API token is missing" not in json.dumps(logout["responses"]["401"])


# --------------------------------------------------------------------------- for clients

METHODS = {"get", "put", "post", "delete", "patch"}


def document(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((OPENAPI_DIR / name).read_text(encoding="utf-8"))
    return loaded


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    return jsonschema_rs.Draft202012Validator({"components": doc["components"], **schema})


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("name", ["public.yaml", "internal.yaml"])
def test_servers_and_one_tag_per_resource(name: str) -> None:
    doc = document(name)
    port = "8080" if name == "public.yaml" else "8081"
    assert [s["url"] for s in doc["servers"]] == [f"http://localhost:{port}"]
    declared = {tag["name"] for tag in doc["tags"]}
    for path, _, operation in operations(doc):
        assert operation["tags"] == [path.split("/")[4]]
        assert set(operation["tags"]) <= declared


@pytest.mark.parametrize("name", ["public.yaml", "internal.yaml"])
def test_no_generic_descriptions_and_no_docstring_markup(name: str) -> None:
    text = list(strings(document(name)))
    assert not [s for s in text if s == "Successful Response"]
    assert not [s for s in text if "``" in s or re.search(r":[a-z]+:`", s)]


@pytest.mark.parametrize("name", ["public.yaml", "internal.yaml"])
def test_every_timestamp_is_a_date_time(name: str) -> None:
    found = 0
    for schema in document(name)["components"]["schemas"].values():
        for prop_name, prop in schema.get("properties", {}).items():
            if not prop_name.endswith("_at"):
                continue
            found += 1
            variants = [v for v in prop.get("anyOf", [prop]) if v.get("type") != "null"]
            assert variants, prop_name
            assert all(v.get("format") == "date-time" for v in variants), (prop_name, prop)
    assert found


HTTP_LAYER = re.compile(r"error_(?:body|response)\(\s*(?:\d+,\s*)?\"([a-z_]+)\"")


def test_the_error_code_enum_lists_every_code_the_code_can_answer_with() -> None:
    used = {cls.code for cls in all_error_classes()}
    for source in (OPENAPI_DIR.parent / "authsession" / "http").glob("*.py"):
        used |= set(HTTP_LAYER.findall(source.read_text(encoding="utf-8")))
    assert "not_found" in used  # the scan sees the HTTP layer's own codes
    for name in ("public.yaml", "internal.yaml"):
        enum = document(name)["components"]["schemas"]["ErrorDetail"]["properties"]["code"]
        assert used <= set(enum["enum"]), used - set(enum["enum"])
        assert set(enum["enum"]) == set(error_catalogue())


def all_error_classes() -> list[type[domain_errors.AuthSessionError]]:
    found = [domain_errors.AuthSessionError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("name", ["public.yaml", "internal.yaml"])
def test_headers_of_401_and_429_and_every_response(name: str) -> None:
    doc = document(name)
    headers = doc["components"]["headers"]
    assert headers["X-Request-ID"]["required"] is True
    assert headers["Cache-Control"]["schema"]["enum"] == ["no-store"]
    if "Retry-After" in headers:
        assert headers["Retry-After"]["schema"]["type"] == "integer"
        assert headers["Retry-After"]["required"] is False  # only with rate_limited
    if "WWW-Authenticate" in headers:
        assert headers["WWW-Authenticate"]["required"] is True
    seen = set()
    for _, _, operation in operations(doc):
        for status, response in operation["responses"].items():
            refs = {k: v["$ref"] for k, v in response["headers"].items()}
            assert refs["X-Request-ID"] == "#/components/headers/X-Request-ID"
            assert refs["Cache-Control"] == "#/components/headers/Cache-Control"
            if status == "401":
                assert refs["WWW-Authenticate"] == "#/components/headers/WWW-Authenticate"
            if status == "429":
                assert refs["Retry-After"] == "#/components/headers/Retry-After"
            seen.add(status)
    assert "429" in seen if name == "public.yaml" else "401" in seen


@pytest.mark.parametrize("name", ["public.yaml", "internal.yaml"])
def test_every_body_has_an_example_that_its_schema_accepts(name: str) -> None:
    doc = document(name)
    checked = 0
    for path, method, operation in operations(doc):
        where = f"{method.upper()} {path}"
        bodies = [("request", operation["requestBody"])] if "requestBody" in operation else []
        bodies += list(operation["responses"].items())
        for status, body in bodies:
            media = body["content"]["application/json"]
            check = validator(doc, media["schema"])
            examples = [media["example"]] if "example" in media else []
            examples += [e["value"] for e in media.get("examples", {}).values()]
            assert examples, (where, status)
            for example in examples:
                assert check.is_valid(example), (where, status, example)
                checked += 1
            if status != "request" and int(status) >= 400:
                codes = re.findall(r"^- `([a-z_]+)`", body["description"], re.M)
                assert codes, (where, status)
                assert sorted(media["examples"]) == sorted(codes), (where, status)
                assert [e["error"]["code"] for e in examples] == codes
    assert checked


def test_a_new_operation_is_documented_by_the_same_rules() -> None:
    app = new_app("test", "A made-up app.")

    class WidgetResponse(BaseModel):
        """A widget, as made up for this test."""

        widget_id: str = Field(examples=["w-1"])
        made_at: Timestamp

    @app.get(
        "/api/v1/public/widgets/{widget_id}",
        response_model=WidgetResponse,
        responses=errors((401, "unauthorized"), (404, "not_found (no such widget)")),
    )
    async def get_widget(widget_id: str) -> WidgetResponse:
        raise NotImplementedError

    doc = contract_openapi(app, servers=[{"url": "http://localhost:1"}])

    operation = doc["paths"]["/api/v1/public/widgets/{widget_id}"]["get"]
    assert operation["tags"] == ["widgets"]
    assert doc["tags"] == [{"name": "widgets"}]
    ok = operation["responses"]["200"]
    assert ok["description"] == "A widget, as made up for this test."
    assert ok["content"]["application/json"]["example"] == {
        "widget_id": "w-1",
        "made_at": "2026-12-02T08:40:00.000Z",
    }
    missing = operation["responses"]["404"]
    assert missing["description"] == (
        "- `not_found`: No route matches the path (a trailing slash included: there are no "
        "redirects) (no such widget)."
    )
    assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
    assert "x-error-codes" not in json.dumps(doc)
    assert "422" not in operation["responses"]


def test_an_error_code_the_service_does_not_have_is_refused() -> None:
    app = new_app("test", "A made-up app.")

    @app.get("/api/v1/public/teapots", responses=errors((418, "i_am_a_teapot")))
    async def teapot() -> None:
        raise NotImplementedError

    with pytest.raises(ValueError, match="i_am_a_teapot"):
        contract_openapi(app)


def test_error_code_lists_parse_codes_and_notes() -> None:
    assert error_codes("invalid_request, invalid_code (details.attempts_remaining)") == [
        {"code": "invalid_request"},
        {"code": "invalid_code", "note": "details.attempts_remaining"},
    ]
    with pytest.raises(ValueError, match="not an error code list"):
        error_codes("Bad Request!")
