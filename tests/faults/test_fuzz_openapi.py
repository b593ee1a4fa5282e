"""A property-based fuzz of the REST API, generated from the gateway's own OpenAPI document and
sent to a real gateway in front of the real services.

Every documented operation gets requests built from its schemas: valid values, values with one
field broken (wrong type, out of range, NaN, unknown or missing field), raw garbage bodies, bad
path parameters, and no or a wrong token. Properties: never a 5xx, every status is one the
document lists for that operation, and every JSON answer matches the schema documented for its
status. Seeded (derandomized) and bounded, so a failure reproduces.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jsonschema  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.openapi import build_document
from tests.faults.suite import ADMIN, REPORTER, Suite, running_suite

pytestmark = pytest.mark.slow

DOCUMENT = build_document()
COMPONENTS = DOCUMENT["components"]
EXAMPLES = int(os.environ.get("ONESEEK_FUZZ_EXAMPLES") or 300)
"""Raise it for a longer search by hand; the default keeps the test to seconds."""
SKIP = {("/", "get"), ("/api/openapi.json", "get")}  # static answers with nothing to fuzz
OPERATIONS = sorted(
    (path, method)
    for path, item in DOCUMENT["paths"].items()
    for method in item
    if (path, method) not in SKIP
)
COUNTS: dict[str, int] = {}
"""Status class -> requests that got it ("2xx", "4xx", "5xx")."""


# ---- strategies from JSON schemas ---------------------------------------------------------------


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = COMPONENTS["schemas"][name]
    return schema


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=6,
    )


def valid(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that match `schema` (the subset of JSON Schema the gateway's document uses)."""
    schema = _resolve(schema)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([valid(part) for part in schema[key]])
    kinds = schema.get("type")
    if isinstance(kinds, list):
        return st.one_of([valid({**schema, "type": kind}) for kind in kinds])
    if kinds == "null":
        return st.none()
    if kinds == "boolean":
        return st.booleans()
    if kinds == "integer":
        low = schema.get("minimum", -(2**40))
        high = schema.get("maximum", 2**40)
        return st.integers(min_value=low, max_value=high)
    if kinds == "number":
        return st.floats(
            min_value=schema.get("minimum", schema.get("exclusiveMinimum", -1e9)),
            max_value=schema.get("maximum", schema.get("exclusiveMaximum", 1e9)),
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
            allow_nan=False,
            allow_infinity=False,
        )
    if kinds == "string":
        if "pattern" in schema:
            # JSON Schema patterns are ECMA-262: \d and \w are ASCII there
            pattern = re.compile(schema["pattern"], re.ASCII)
            return st.from_regex(pattern, fullmatch=True).filter(lambda s: len(s) < 200)
        return st.text(max_size=20)
    if kinds == "array":
        items = valid(schema.get("items", {}))
        return st.lists(
            items,
            min_size=schema.get("minItems", 0),
            max_size=min(schema.get("maxItems", 4), 4),
            unique=bool(schema.get("uniqueItems")),
        )
    if kinds == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        extra = schema.get("additionalProperties")
        if not properties and isinstance(extra, dict):
            low = schema.get("minProperties", 0)
            return st.dictionaries(
                st.text(min_size=1, max_size=10),
                valid(extra),
                min_size=low,
                max_size=max(low, min(schema.get("maxProperties", 3), 3)),
            )
        return st.fixed_dictionaries(
            {name: valid(part) for name, part in properties.items() if name in required},
            optional={
                name: valid(part) for name, part in properties.items() if name not in required
            },
        )
    return _json_values()


@st.composite
def broken(draw: st.DrawFn, schema: dict[str, Any]) -> Any:
    """A valid object of `schema` with one thing wrong."""
    value = draw(valid(schema))
    if not isinstance(value, dict):
        return draw(_json_values())
    how = draw(st.sampled_from(["wrong value", "unknown field", "missing field", "edge number"]))
    keys = sorted(_resolve(schema).get("properties", {}))
    if how == "unknown field":
        value[draw(st.text(min_size=1, max_size=12))] = draw(_json_values())
    elif how == "missing field" and value:
        value.pop(draw(st.sampled_from(sorted(value))))
    elif keys:
        key = draw(st.sampled_from(keys))
        if how == "wrong value":
            value[key] = draw(_json_values())
        else:
            value[key] = draw(
                st.sampled_from(
                    [
                        0,
                        -1,
                        -(2**63),
                        2**63,
                        2**64 + 1,
                        10**30,
                        1e308,
                        -0.0,
                        0.5,
                        math.nan,
                        math.inf,
                        True,
                        "",
                        "1",
                        [],
                        {},
                        None,
                        "../" * 8 + "etc/passwd",
                    ]
                )
            )
    return value


# ---- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    template: str
    path: str
    body: bytes | None
    authorization: str | None


def _parameter(parameter: dict[str, Any]) -> st.SearchStrategy[str]:
    schema = parameter.get("schema", {})
    good = valid(schema).map(str)
    bad = st.one_of(
        st.text(max_size=30),
        st.sampled_from(["..", "../../etc/passwd", "run-20260101-12:00:00", "run-1", "%00", " "]),
    )
    return st.one_of(good, bad)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    template, method = draw(st.sampled_from(OPERATIONS))
    operation = DOCUMENT["paths"][template][method]
    path, query = template, {}
    for parameter in operation.get("parameters", []):
        value = draw(_parameter(parameter))
        if parameter["in"] == "path":
            # some bad ids go raw (".." and "/" reach the router as they are)
            raw = draw(st.booleans()) and re.fullmatch(r"[\w.:-]+", value, re.ASCII) is not None
            path = path.replace(
                "{" + parameter["name"] + "}", value if raw else quote(value, safe="")
            )
        elif draw(st.booleans()):
            query[parameter["name"]] = value
    if query:
        path += "?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query.items())
    body: bytes | None = None
    if "requestBody" in operation:
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        kind = draw(st.sampled_from(["valid", "broken", "broken", "garbage", "json"]))
        if kind == "garbage":
            body = draw(st.binary(max_size=64))
        else:
            value = draw(
                valid(schema)
                if kind == "valid"
                else broken(schema)
                if kind == "broken"
                else _json_values()
            )
            body = json.dumps(value).encode()  # NaN and Infinity go out as such
    authorization = draw(
        st.sampled_from(
            [f"Bearer {ADMIN}"] * 6 + [f"Bearer {REPORTER}", None, "Bearer not-the-token"]
        )
    )
    return Request(method.upper(), template, path, body, authorization)


# ---- the property -------------------------------------------------------------------------------


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            **schema,
            "components": COMPONENTS,
        }
    )


def _documented(template: str, method: str, status: int) -> dict[str, Any] | None:
    response = DOCUMENT["paths"][template][method.lower()]["responses"].get(str(status))
    if response is None:
        return None
    if "$ref" in response:
        response = COMPONENTS["responses"][response["$ref"].rsplit("/", 1)[-1]]
    return dict(response)


@pytest.fixture(scope="module")
def fuzz_suite(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[Suite]:
    with running_suite(tmp_path_factory.mktemp("fuzz"), demo_models_dir) as suite:
        yield suite


def send(suite: Suite, request: Request) -> tuple[int, str, bytes]:
    address = urlsplit(suite.gateway.url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if request.authorization is not None:
        headers["Authorization"] = request.authorization
    try:
        connection.request(request.method, request.path, body=request.body, headers=headers)
        reply = connection.getresponse()
        return reply.status, reply.getheader("Content-Type", ""), reply.read()
    finally:
        connection.close()


def test_the_rest_api_never_answers_5xx(fuzz_suite: Suite) -> None:
    suite = fuzz_suite

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests())
    def check(request: Request) -> None:
        status, content_type, raw = send(suite, request)
        kind = f"{status // 100}xx"
        COUNTS[kind] = COUNTS.get(kind, 0) + 1
        assert status < 500, (request, raw[:500])
        response = _documented(request.template, request.method, status)
        assert response is not None, (f"status {status} is not documented", request, raw[:300])
        if "application/json" not in content_type:
            assert "application/json" not in response.get("content", {}), (request, content_type)
            return
        schema = response["content"]["application/json"]["schema"]
        _validator(schema).validate(json.loads(raw))

    check()
    total = sum(COUNTS.values())
    print(f"fuzz: {total} requests {COUNTS}; 5xx: {COUNTS.get('5xx', 0)} / {total}")
    assert total >= EXAMPLES and COUNTS.get("5xx", 0) == 0
    assert COUNTS.get("4xx", 0) > 0 and COUNTS.get("2xx", 0) > 0  # both sides were reached
    certified = suite.models_dir / "oneseek-certified"
    assert not certified.exists() or not any(certified.iterdir()), "the fuzz started a run"
    assert "Traceback" not in suite.outputs()
