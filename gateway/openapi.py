"""`GET /api/openapi.json`: an OpenAPI 3.1 description of every route (`gateway.routes.ROUTES`),
its inputs, its answers and its errors, and of every websocket message.

The schemas of answers and events are derived from the .proto descriptors by the same rules as
`services.api.codec.message_to_dict` (every field present, optional values and sub-messages
nullable, enums as lower-case names, timestamps ISO 8601 with milliseconds and `Z`), so they
cannot drift from what the gateway sends; the tests validate real answers against them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from gateway.auth import Access
from gateway.bodies import JSON_TYPE
from gateway.errors import ERROR_CODES
from gateway.routes import ROUTES, Answer, Route
from services.api import metrics_pb2, training_pb2
from services.api.codec import INTEGER_TYPES, NUMBER_TYPES, is_map
from services.api.generate_request import ROLES
from services.api.reports import MAX_EPOCHS, MAX_REPORTED_MODELS
from services.core.layout import ARTIFACTS
from services.core.training_config import (
    GENERATE_OPTIONS,
    MODEL_NAME_RE,
    START_OPTIONS,
    TRAINING_CONFIG,
    public_config,
)

TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"
RUN_ID_PATTERN = TRAINING_CONFIG["metadata"]["run_id_pattern"]
_TIMESTAMP = "google.protobuf.Timestamp"
EVENT_KINDS = tuple(
    f.name for f in training_pb2.TrainingEvent.DESCRIPTOR.oneofs_by_name["payload"].fields
)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(**properties: Any) -> dict[str, Any]:
    """A closed object: every property present, no other."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    kind = schema["type"]
    nullable = {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable


class Schemas:
    """components/schemas, filled on demand from message descriptors."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self._owners: dict[str, str] = {}

    def message(self, descriptor: Any, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """A $ref to the schema of `descriptor`'s JSON shape (registered once)."""
        name = descriptor.name
        owner = self._owners.setdefault(name, descriptor.full_name)
        assert owner == descriptor.full_name, f"two messages named {name}"
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder first: messages may refer to each other
            self.schemas[name] = self.object_of(descriptor, skip=skip)
        return _ref(name)

    def object_of(self, descriptor: Any, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for field in descriptor.fields:
            if field.name in skip:
                continue
            oneof = field.containing_oneof
            if oneof is not None and not oneof.name.startswith("_"):
                continue  # a real oneof is flattened by its caller (the event payload)
            properties[field.name] = self.field(field)
        return _obj(**properties)

    def field(self, field: Any) -> dict[str, Any]:
        if is_map(field):
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.scalar(value)}
        if field.is_repeated:
            return {"type": "array", "items": self.scalar(field)}
        schema = self.scalar(field)
        if field.has_presence and "null" not in str(schema.get("type", "")):
            return _nullable(schema)
        return schema

    def scalar(self, field: Any) -> dict[str, Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.full_name == _TIMESTAMP:
                return {"type": "string", "pattern": TIMESTAMP_PATTERN}
            return self.message(field.message_type)
        if field.type == FieldDescriptor.TYPE_ENUM:
            prefix = _enum_prefix(field.enum_type)
            names = [
                v.name.removeprefix(prefix).lower() for v in field.enum_type.values if v.number
            ]
            return {"type": ["string", "null"], "enum": [*names, None]}
        if field.type in INTEGER_TYPES:
            return {"type": "integer"}
        if field.type in NUMBER_TYPES:
            return {"type": "number"}
        if field.type == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        return {"type": "string"}


def _enum_prefix(enum: Any) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def _value_schema(value: Any) -> dict[str, Any]:
    """The schema of a configuration value, from the value itself (the config is the source)."""
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, Mapping):
        return _obj(**{key: _value_schema(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return {"type": "array"}
    return {}


def event_schema_name(kind: str) -> str:
    """ "epoch_end" -> "EpochEndEvent"."""
    return "".join(part.title() for part in kind.split("_")) + "Event"


def _envelope(kind: str) -> dict[str, Any]:
    return {
        "type": {"const": kind},
        "run_id": {"type": "string"},
        "seq": {"type": "integer", "minimum": 0},
        "timestamp": {"type": "string", "pattern": TIMESTAMP_PATTERN},
    }


def _event_schemas(schemas: Schemas) -> dict[str, Any]:
    events: dict[str, Any] = {}
    for kind in EVENT_KINDS:
        payload: Any = training_pb2.TrainingEvent.DESCRIPTOR.fields_by_name[kind].message_type
        if kind == "initial_state":
            body = schemas.object_of(
                training_pb2.RunMetrics.DESCRIPTOR, skip=("run_id", "timestamp")
            )
            body["properties"]["config"] = _nullable(
                schemas.message(training_pb2.RunConfig.DESCRIPTOR)
            )
            body["properties"]["models"] = {
                "type": "array",
                "items": schemas.message(training_pb2.ModelInfo.DESCRIPTOR),
            }
        else:
            body = schemas.object_of(payload)
        properties = {**_envelope(kind), **body["properties"]}
        events[event_schema_name(kind)] = _obj(**properties)
    error = {
        **_envelope("error"),
        "run_id": {"type": ["string", "null"]},
        "seq": {"type": "null"},
        "error": {"type": "string"},
        "message": {"type": "string"},
    }
    events[event_schema_name("error")] = _obj(**error)
    events["WebSocketMessage"] = {"oneOf": [_ref(name) for name in events]}
    return events


def _start_body() -> dict[str, Any]:
    properties = {
        option.camel: option.schema() if option.required else _nullable(option.schema())
        for option in START_OPTIONS
    }
    return {
        "type": "object",
        "description": "Absent or null optional fields take the defaults of GET /api/config.",
        "properties": properties,
        "required": [option.camel for option in START_OPTIONS if option.required],
        "additionalProperties": False,
    }


def _generate_body() -> dict[str, Any]:
    limits = TRAINING_CONFIG["generation"]
    text = {"type": "string", "maxLength": limits["max_prompt_chars"]}
    names = {"type": "string", "pattern": MODEL_NAME_RE.pattern}
    turn = _obj(role={"enum": list(ROLES)}, content={"type": "string"})
    properties: dict[str, Any] = {
        "models": _nullable(
            {
                "type": "array",
                "items": names,
                "uniqueItems": True,
                "maxItems": TRAINING_CONFIG["limits"]["max_models"],
                "description": "Models of the run; absent: the run's best model.",
            }
        ),
        "prompt": _nullable({**text, "description": "The text to continue (or messages)."}),
        "messages": _nullable(
            {
                "type": "array",
                "items": turn,
                "maxItems": limits["max_messages"],
                "description": "A chat, for models whose tokenizer has a chat template; "
                "instead of prompt.",
            }
        ),
        **{option.camel: _nullable(option.schema()) for option in GENERATE_OPTIONS},
        "stop": _nullable(
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": limits["max_stop_chars"]},
                "maxItems": limits["max_stop"],
                "description": "Generation ends before the first of these texts.",
            }
        ),
    }
    return {
        "type": "object",
        "description": "prompt or messages is required (not both); absent or null options take "
        "the defaults of GET /api/config (generation).",
        "properties": properties,
        "additionalProperties": False,
    }


def _generate_events(schemas: Schemas) -> dict[str, Any]:
    """The data of each Server-Sent Event of POST /api/training/{runId}/generate."""
    events: dict[str, Any] = {}
    for kind in ("started", "token", "done"):
        payload: Any = training_pb2.GenerateEvent.DESCRIPTOR.fields_by_name[kind].message_type
        body = schemas.object_of(payload)
        name = "Generate" + kind.title() + "Event"
        events[name] = _obj(model={"type": "string"}, **body["properties"])
    events["GenerateStreamEvent"] = {"oneOf": [_ref(name) for name in events]}
    return events


def _report_body(schemas: Schemas) -> dict[str, Any]:
    losses = {
        "type": "object",
        "additionalProperties": {"type": "number"},
        "maxProperties": MAX_REPORTED_MODELS,
    }
    auto_stop = schemas.object_of(training_pb2.AutoStopInfo.DESCRIPTOR)
    auto_stop["required"] = []
    properties = {
        "epoch": {"type": "integer", "minimum": 1, "maximum": MAX_EPOCHS},
        "total_epochs": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_EPOCHS},
        "val_losses": {**losses, "minProperties": 1},
        "train_losses": _nullable(losses),
        "weights": _nullable(losses),
        "lr_multipliers": _nullable(losses),
        "total_loss": {"type": ["number", "null"]},
        "auto_stop_info": _nullable(auto_stop),
        "progress_percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
    }
    return {
        "type": "object",
        "description": "One epoch of an outside training process, like an epoch_end payload.",
        "properties": properties,
        "required": ["epoch", "val_losses"],
        "additionalProperties": False,
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR_RESPONSES = {
    "400": "Bad input: the `field` names the request field and `message` what is allowed "
    "(on /ws/training: a plain GET that is not a websocket upgrade).",
    "401": "Missing or wrong bearer token.",
    "403": "Refused: a cross-site request, or a non-loopback Host without a token.",
    "404": "Unknown run, model, dataset or route.",
    "409": "The run's state forbids it (e.g. a run is already active and the limit is reached).",
    "413": "The request body is larger than the gateway's limit.",
    "429": "The service is overloaded.",
    "501": "Not available in this version.",
    "502": "A service failed.",
    "503": "A service is down; the gateway recovers by itself when it is back.",
}


_PARAMETERS: dict[str, dict[str, Any]] = {
    "runId": {
        "schema": {"type": "string", "pattern": RUN_ID_PATTERN},
        "description": "run-YYYYMMDD-HHMMSS[-N]; anything else is refused with 400 first.",
    },
    "name": {"schema": {"enum": list(ARTIFACTS)}},  # only artifacts have a `{name}`
    "since": {"schema": {"type": "integer", "minimum": 0}},
    "model": {"schema": {"type": "string", "pattern": MODEL_NAME_RE.pattern}},
    "merge": {
        "schema": {"enum": ["true", "false"]},
        "description": "true: the LoRA adapter merged into the base weights; false (default): "
        "the adapter alone.",
    },
    "token": {
        "schema": {"type": "string"},
        "description": "The admin token, where the Authorization header cannot be set (browsers).",
    },
}
_BEARER: dict[str, Any] = {"bearerAuth": []}
_SECURITY = {
    Access.OPEN: [{}],
    Access.READ: [{}, _BEARER],
    Access.REPORT: [_BEARER],
    Access.ADMIN: [_BEARER],
}


def _answer(answer: Answer) -> dict[str, Any]:
    if answer.media != JSON_TYPE:
        return {"description": answer.description, "content": {answer.media: {}}}
    return _json(_ref(answer.schema) if answer.schema else {"type": "object"}, answer.description)


def _operation(route: Route) -> dict[str, Any]:
    responses = {str(answer.status): _answer(answer) for answer in route.answers}
    responses.update({str(s): {"$ref": f"#/components/responses/Error{s}"} for s in route.errors})
    operation: dict[str, Any] = {
        "summary": route.summary,
        "security": _SECURITY[route.access],
        "responses": responses,
    }
    where = [(name, "path") for name in re.findall(r"{(\w+)}", route.path)]
    where += [(name, "query") for name in route.query]
    if where:
        operation["parameters"] = [
            {"name": name, "in": place, "required": place == "path", **_PARAMETERS[name]}
            for name, place in where
        ]
    if route.body is not None:
        body = {JSON_TYPE: {"schema": _ref(route.body)}}
        operation["requestBody"] = {"required": True, "content": body}
    return operation


def build_document() -> dict[str, Any]:
    schemas = Schemas()
    ref = schemas.message
    run, summary = ref(training_pb2.Run.DESCRIPTOR), ref(metrics_pb2.RunSummary.DESCRIPTOR)
    ref(training_pb2.RunMetrics.DESCRIPTOR)  # answers that ROUTES names
    ref(metrics_pb2.Leaderboard.DESCRIPTOR)
    model, dataset = (
        ref(training_pb2.ModelInfo.DESCRIPTOR),
        ref(training_pb2.DatasetInfo.DESCRIPTOR),
    )
    status_name = {"type": ["string", "null"]}
    components = schemas.schemas
    components.update(_event_schemas(schemas))
    components.update(_generate_events(schemas))
    components.update(
        {
            "Error": _obj(
                error={"type": "string", "enum": sorted(set(ERROR_CODES.values()))},
                message={"type": "string"},
                field={"type": ["string", "null"]},
            ),
            "Config": _value_schema(public_config()),
            "StartRequest": _start_body(),
            "ReportRequest": _report_body(schemas),
            "GenerateRequest": _generate_body(),
            "RunAccepted": _obj(
                success={"const": True}, runId={"type": "string"}, status=status_name
            ),
            "ReportAccepted": _obj(success={"type": "boolean"}, seq={"type": "integer"}),
            "Models": _obj(models={"type": "array", "items": model}),
            "Datasets": _obj(datasets={"type": "array", "items": dataset}),
            "TrainingStatus": _obj(
                active={"type": "array", "items": run}, max_active_runs={"type": "integer"}
            ),
            "Runs": _obj(runs={"type": "array", "items": summary}),
            "Health": _obj(
                status={"enum": ["ok", "degraded"]},
                training={"type": "boolean"},
                metrics={"type": "boolean"},
            ),
            "Artifact": {"type": "object", "description": "The run folder file's JSON, as is."},
        }
    )
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "OneSeek DNA training gateway",
            "version": "1",
            "description": "Request bodies are camelCase, answers snake_case. Every error is "
            '{"error", "message", "field"}. Admin routes need the admin token; reads are open '
            "on loopback.",
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {
                f"Error{status}": _json(_ref("Error"), text)
                for status, text in _ERROR_RESPONSES.items()
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "ONESEEK_ADMIN_TOKEN (or ONESEEK_REPORT_TOKEN for reports).",
                }
            },
        },
    }
