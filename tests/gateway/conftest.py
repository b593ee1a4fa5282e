"""Fixtures for the gateway tests: the real training and metrics services as child processes
(once per session, with tokens, tiny demo models and 60 sample records), a gateway app in this
test's event loop, and validation of answers against the gateway's own OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import jsonschema  # type: ignore[import-untyped]
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.openapi import build_document
from gateway.settings import GatewaySettings
from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from tests.processes import ServiceProcess, workspace_env

ADMIN = "admin-secret-token"
REPORTER = "report-secret-token"
MODELS = ["tiny-llama", "tiny-gpt2"]


@dataclass
class Suite:
    training: ServiceProcess
    metrics: ServiceProcess
    env: dict[str, str]
    logs: Path

    def settings(self, **changes: Any) -> GatewaySettings:
        base = GatewaySettings(
            host="127.0.0.1",
            port=0,
            training_addr=self.training.addr,
            metrics_addr=self.metrics.addr,
            admin_token=ADMIN,
            report_token=REPORTER,
            heartbeat_interval=0.2,
            feed_linger=0.5,
            resubscribe_initial=0.05,
            resubscribe_max=0.5,
            close_timeout=5.0,
        )
        return replace(base, **changes)

    def training_stub(self) -> training_pb2_grpc.TrainingServiceStub:
        return training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(self.training.addr))

    def metrics_stub(self) -> metrics_pb2_grpc.MetricsServiceStub:
        return metrics_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(self.metrics.addr))


@pytest.fixture(scope="session")
def suite_env(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gateway-suite")
    return workspace_env(
        root, demo_models_dir, ONESEEK_ADMIN_TOKEN=ADMIN, ONESEEK_REPORT_TOKEN=REPORTER
    )


@pytest.fixture(scope="session")
def suite(suite_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    logs = tmp_path_factory.mktemp("gateway-logs")
    training = ServiceProcess("training-service", env=suite_env, log=logs / "training.log")
    training.start()
    metrics = ServiceProcess(
        "metrics-service",
        "--training-addr",
        training.addr,
        env=suite_env,
        log=logs / "metrics.log",
    )
    try:
        metrics.start()
    except BaseException:
        training.stop()
        raise
    parts = Suite(training=training, metrics=metrics, env=suite_env, logs=logs)
    yield parts
    metrics_code = parts.metrics.stop()
    training_code = training.stop()
    assert metrics_code == 0, parts.metrics.output()
    assert training_code == 0, training.output()


GatewayFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_gateway(suite: Suite) -> AsyncIterator[GatewayFactory]:
    """Builds gateways on the real services (settings overridable); closes them all after."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(**changes: Any) -> TestClient[web.Request, web.Application]:
        server = TestServer(create_app(suite.settings(**changes)), host="127.0.0.1")
        client = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        await client.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> TestClient[web.Request, web.Application]:
    return await make_gateway()


ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
REPORT_HEADERS = {"Authorization": f"Bearer {REPORTER}"}


# ---- the OpenAPI document as the oracle of every shape ------------------------------------------

_DOCUMENT = build_document()


def schema_validator(ref: dict[str, Any]) -> jsonschema.Draft202012Validator:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **ref}
    schema["components"] = _DOCUMENT["components"]
    return jsonschema.Draft202012Validator(schema)


def component(name: str) -> jsonschema.Draft202012Validator:
    return schema_validator({"$ref": f"#/components/schemas/{name}"})


def template_of(path: str) -> str:
    """The document's path template that `path` is an instance of."""
    for template in _DOCUMENT["paths"]:
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
            return str(template)
    raise KeyError(f"{path} is not documented")


async def answer(
    response: ClientResponse, status: int, *, path: str | None = None, method: str = "get"
) -> Any:
    """The JSON of `response`, after checking its status and validating it against the schema
    the OpenAPI document gives for that route and status (the Error schema for errors)."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", response.content_type
    data = json.loads(text)
    if (status >= 400 and status != 503) or (status == 503 and "error" in data):
        component("Error").validate(data)
        return data
    template = path or template_of(response.url.path)
    operation = _DOCUMENT["paths"][template][method]
    schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
    schema_validator(schema).validate(data)
    return data


# ---- runs ---------------------------------------------------------------------------------------


def start_run(suite: Suite, epochs: int = 2, **fields: Any) -> str:
    """Starts a tiny run over gRPC, waiting while a previous run still occupies the service."""
    stub = suite.training_stub()
    request = training_pb2.StartRunRequest(
        dataset_id="small",
        base_models=fields.pop("models", MODELS),
        epochs=epochs,
        refresh_interval=0.05,
        auto_stop_threshold=0.0,
        **fields,
    )
    for _ in range(600):
        try:
            reply = stub.StartRun(
                request, timeout=30, metadata=(("authorization", f"Bearer {ADMIN}"),)
            )
            return str(reply.run_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            time.sleep(0.1)
    raise TimeoutError("the training service stayed busy")


def wait_finished(suite: Suite, run_id: str, timeout: float = 180) -> metrics_pb2.RunSummary:
    """Until the metrics service reports the run in a terminal status."""
    stub = suite.metrics_stub()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in stub.ListRuns(metrics_pb2.ListRunsRequest(), timeout=5).runs:
            if run.run_id == run_id and run.status not in (
                training_pb2.RUN_STATUS_UNSPECIFIED,
                training_pb2.RUN_STATUS_RUNNING,
            ):
                return run
        time.sleep(0.1)
    raise TimeoutError(f"{run_id} did not finish")


@pytest.fixture(scope="session")
def finished_run(suite: Suite) -> str:
    """One completed two-model, two-epoch run the read tests share."""
    run_id = start_run(suite, epochs=2)
    wait_finished(suite, run_id)
    return run_id


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)
