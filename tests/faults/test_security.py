"""Security, against the real processes where it matters: no mutation without the right token on
any interface (REST, websocket, gRPC) and nothing changed by the attempts; tokens compared in
constant time and never logged; the admin token file is 0600; no public bind without a token;
the page's security headers and no inline script or style.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.openapi import build_document
from gateway.page import CONTENT_SECURITY_POLICY
from gateway.settings import STATIC_DIR, GatewaySettings
from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from tests.faults.suite import ADMIN, REPORTER, Suite, running_suite
from tests.processes import ONESEEK, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN = "run-20260101-120000"
WRONG = "wrong-token-value-8d2e4f"
"""A wrong token is often a mistyped right one: it must not be logged either."""
START_BODY = {"datasetId": "small", "baseModels": ["tiny-llama"], "epochs": 1}
REPORT_BODY = {"epoch": 1, "val_losses": {"outside-model": 2.0}}


@dataclass
class World:
    suite: Suite


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[World]:
    root = tmp_path_factory.mktemp("security")
    # DEBUG: whatever the libraries log at their most talkative must still hold no token
    with running_suite(root, demo_models_dir, ONESEEK_LOG_LEVEL="DEBUG") as suite:
        yield World(suite)


def bad_authorizations(*, admin_only: bool) -> list[str | None]:
    """No header, and headers that are close to a right one but not it."""
    wrong: list[str | None] = [
        None,
        f"Bearer {WRONG}",
        f"Bearer {ADMIN[:-1]}",
        f"Bearer {ADMIN}x",
        f"Bearer {ADMIN.upper()}",
        f"bearer {ADMIN}",
        f"Basic {ADMIN}",
        f"Bearer  {ADMIN}",
        "Bearer ",
        ADMIN,
    ]
    return [*wrong, f"Bearer {REPORTER}"] if admin_only else wrong


def _body_of(path: str) -> dict[str, Any] | None:
    if path.endswith("start-dna-v2"):
        return START_BODY
    if path.endswith("/metrics"):
        return REPORT_BODY
    return None


def mutating_routes() -> list[tuple[str, dict[str, Any] | None, bool]]:
    """(path, body, admin only) of every POST in the gateway's own OpenAPI document, so a new
    route is covered the day it is added."""
    routes = []
    for template, operations in build_document()["paths"].items():
        if "post" in operations:
            path = template.replace("{runId}", RUN)
            routes.append((path, _body_of(path), not path.endswith("/metrics")))
    return routes


async def nothing_changed(suite: Suite, session: aiohttp.ClientSession) -> None:
    """No run on either service, no run folder."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with session.get(f"{suite.gateway.url}/api/training/runs", headers=headers) as reply:
        assert reply.status == 200 and (await reply.json()) == {"runs": []}
    async with session.get(
        f"{suite.gateway.url}/api/admin/training/status", headers=headers
    ) as reply:
        assert (await reply.json())["active"] == []
    certified = suite.models_dir / "oneseek-certified"
    assert not certified.exists() or not any(certified.iterdir())


async def test_no_rest_mutation_without_the_right_token(world: World) -> None:
    suite = world.suite
    routes = mutating_routes()
    assert {path.split("/")[-1] for path, _, _ in routes} >= {
        "start-dna-v2",
        "stop",
        "resume",
        "metrics",
    }
    refused = 0
    async with aiohttp.ClientSession() as session:
        for path, body, admin_only in routes:
            for authorization in bad_authorizations(admin_only=admin_only):
                headers = {} if authorization is None else {"Authorization": authorization}
                async with session.post(
                    suite.gateway.url + path, json=body, headers=headers
                ) as reply:
                    envelope = await reply.json()
                    assert reply.status == 401, (path, authorization, envelope)
                    assert envelope["error"] == "unauthorized"
                    assert "token" in envelope["message"]
                    refused += 1
            # the right token from another site's page: refused as cross-site (403)
            headers = {"Authorization": f"Bearer {ADMIN}", "Origin": "http://evil.example"}
            async with session.post(suite.gateway.url + path, json=body, headers=headers) as reply:
                assert reply.status == 403, (path, await reply.text())
        await nothing_changed(suite, session)
    assert refused >= 40


# token checked: what changes something, and what spends compute or hands out weights
MUTATING_RPCS = {
    "oneseek.training.v1.TrainingService": {
        "StartRun",
        "StopRun",
        "ResumeRun",
        "Generate",
        "ExportModel",
    },
    "oneseek.metrics.v1.MetricsService": {"ReportMetrics", "ReportMetricsBatch"},
}
READ_RPCS = {
    "oneseek.training.v1.TrainingService": {
        "GetRun",
        "ListRuns",
        "WatchRun",
        "StreamEvents",
        "GetArtifact",
        "ListModels",
        "ListDatasets",
    },
    "oneseek.metrics.v1.MetricsService": {
        "GetMetrics",
        "GetLeaderboard",
        "ListRuns",
        "Subscribe",
    },
}
RPC_REQUESTS: dict[str, Any] = {
    "StartRun": training_pb2.StartRunRequest(
        dataset_id="small", base_models=["tiny-llama"], epochs=1
    ),
    "StopRun": training_pb2.StopRunRequest(run_id=RUN),
    "ResumeRun": training_pb2.ResumeRunRequest(run_id=RUN),
    "Generate": training_pb2.GenerateRequest(run_id=RUN, prompt="hello"),
    "ExportModel": training_pb2.ExportModelRequest(run_id=RUN, model="tiny-llama"),
    "ReportMetrics": metrics_pb2.ReportMetricsRequest(
        run_id=RUN, epoch=1, val_losses={"outside-model": 2.0}
    ),
    "ReportMetricsBatch": metrics_pb2.ReportMetricsBatchRequest(
        reports=[
            metrics_pb2.ReportMetricsRequest(run_id=RUN, epoch=1, val_losses={"outside-model": 2.0})
        ]
    ),
}


def test_every_rpc_is_classified() -> None:
    """A new RPC must be put on one side: mutating (token checked) or read."""
    for file in (training_pb2.DESCRIPTOR, metrics_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            methods = {method.name for method in service.methods}
            mutating = MUTATING_RPCS[service.full_name]
            assert methods == mutating | READ_RPCS[service.full_name], service.full_name
            assert not mutating & READ_RPCS[service.full_name]


def test_no_grpc_mutation_without_the_right_token(world: World) -> None:
    suite = world.suite
    refused = 0
    for service, methods in MUTATING_RPCS.items():
        training = service.endswith("TrainingService")
        addr = suite.training.addr if training else suite.metrics.addr
        with grpc.insecure_channel(addr) as channel:
            stub: Any = (
                training_pb2_grpc.TrainingServiceStub(channel)
                if training
                else metrics_pb2_grpc.MetricsServiceStub(channel)
            )
            for name in sorted(methods):
                for authorization in bad_authorizations(admin_only=training):
                    metadata = () if authorization is None else (("authorization", authorization),)
                    with pytest.raises(grpc.RpcError) as caught:
                        reply = getattr(stub, name)(
                            RPC_REQUESTS[name], timeout=20, metadata=metadata
                        )
                        if name in ("Generate", "ExportModel"):  # a stream fails when read
                            list(reply)
                    error: Any = caught.value
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (
                        name,
                        authorization,
                        error.details(),
                    )
                    assert "token" in error.details()
                    refused += 1
    assert refused >= 40
    with grpc.insecure_channel(suite.training.addr) as channel:
        runs = training_pb2_grpc.TrainingServiceStub(channel).ListRuns(
            training_pb2.ListRunsRequest(), timeout=20
        )
        assert list(runs.runs) == []
    with grpc.insecure_channel(suite.metrics.addr) as channel:
        summaries = metrics_pb2_grpc.MetricsServiceStub(channel).ListRuns(
            metrics_pb2.ListRunsRequest(), timeout=20
        )
        assert list(summaries.runs) == []  # no report was stored


async def test_websocket_and_reads_need_the_token_off_loopback(world: World) -> None:
    """A gateway that listens beyond loopback (here: settings say so, the socket stays local)
    lets no one read or watch without the admin token; on loopback reads are open by design
    (README: REST API), and a cross-site page is refused either way."""
    suite = world.suite
    settings = GatewaySettings(
        host="192.0.2.10",
        port=0,
        training_addr=suite.training.addr,
        metrics_addr=suite.metrics.addr,
        admin_token=ADMIN,
        report_token=REPORTER,
        close_timeout=5.0,
    )
    client = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
    await client.start_server()
    try:
        for query in (f"runId={RUN}", f"runId={RUN}&token={WRONG}", f"runId={RUN}&token="):
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await client.ws_connect(f"/ws/training?{query}")
            assert caught.value.status == 401, query
        for authorization in bad_authorizations(admin_only=True):
            headers = {} if authorization is None else {"Authorization": authorization}
            reply = await client.get("/api/training/runs", headers=headers)
            assert reply.status == 401, authorization
        # with the token the socket opens: the unknown run is then refused as such
        async with client.ws_connect(f"/ws/training?runId={RUN}&token={ADMIN}") as ws:
            message = await ws.receive_json(timeout=30)
            assert message["type"] == "error" and RUN in message["message"]
    finally:
        await client.close()
    async with aiohttp.ClientSession() as session:
        url = f"{suite.gateway.url}/ws/training?runId={RUN}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(url, headers={"Origin": "http://evil.example"})
        assert caught.value.status == 403
        async with session.ws_connect(url) as ws:  # loopback: open for reading
            assert (await ws.receive_json(timeout=30))["type"] == "error"


async def test_tokens_are_never_logged(world: World) -> None:
    """Authorized and refused calls on every interface, then every log line is searched."""
    suite = world.suite
    async with aiohttp.ClientSession() as session:
        for token in (ADMIN, REPORTER, WRONG):
            headers = {"Authorization": f"Bearer {token}"}
            for path in ("/api/admin/models", "/api/training/runs", "/api/config"):
                async with session.get(suite.gateway.url + path, headers=headers) as reply:
                    await reply.read()
            async with session.post(
                f"{suite.gateway.url}/api/training/{RUN}/metrics",
                json={"epoch": 0},
                headers=headers,
            ) as reply:
                await reply.read()
            url = f"{suite.gateway.url}/ws/training?runId={RUN}&token={token}"
            async with session.ws_connect(url) as ws:
                await ws.receive(timeout=30)
    for token in (ADMIN, WRONG):
        with grpc.insecure_channel(suite.training.addr) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.StopRun(
                    training_pb2.StopRunRequest(run_id=RUN),
                    timeout=20,
                    metadata=(("authorization", f"Bearer {token}"),),
                )
    # malformed HTTP (raw UTF-8 in the request line) is logged by aiohttp with the request
    # line: the token in its query must not come along
    for token in (ADMIN, WRONG):
        await asyncio.to_thread(raw_request, suite, f"/ws/training?runId=\uff12&token={token}")
    await asyncio.sleep(0.2)  # the access log line is written after the answer
    logs = suite.outputs()
    assert "GET /api/training/runs" in logs  # the logs are the ones these calls wrote
    for secret in (ADMIN, REPORTER, WRONG):
        assert secret not in logs, secret


def raw_request(suite: Suite, target: str) -> bytes:
    """One GET with `target` sent as raw UTF-8 bytes (no client would encode it so)."""
    address = urlsplit(suite.gateway.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(
            b"GET " + target.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
    return answer


def test_malformed_http_is_one_redacted_warning() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    from gateway.cli import _malformed_http_in_one_line

    try:
        raise BadHttpMessage(f"Invalid char in url path: b'GET /ws?x=1&token={ADMIN} HTTP/1.1'")
    except BadHttpMessage:
        record = logging.LogRecord(
            "aiohttp.server",
            logging.ERROR,
            __file__,
            1,
            "Error handling request from %s",
            ("127.0.0.1",),
            sys.exc_info(),
        )
    assert _malformed_http_in_one_line(record)
    line = logging.Formatter().format(record)
    assert record.levelno == logging.WARNING and "Traceback" not in line
    assert ADMIN not in line and "token=<redacted>" in line and "127.0.0.1" in line
    assert "answered 400" in line


def test_admin_token_file_is_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from services.up import admin_token_file, ensure_admin_token

    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("ONESEEK_ADMIN_TOKEN", raising=False)
    token = ensure_admin_token()
    path = admin_token_file()
    assert len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert ensure_admin_token() == token  # kept, not replaced
    path.chmod(0o644)  # restored from a backup with loose permissions
    assert ensure_admin_token() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.setenv("ONESEEK_ADMIN_TOKEN", "from-the-environment")
    assert ensure_admin_token() == "from-the-environment"


def test_gateway_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    env = {**os.environ, "ONESEEK_ADMIN_TOKEN": "", "ONESEEK_GATEWAY_HOST": ""}
    port = free_port()
    done = subprocess.run(
        [ONESEEK, "gateway", "--host", "0.0.0.0", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "ONESEEK_ADMIN_TOKEN" in done.stderr and "0.0.0.0" in done.stderr


async def test_security_headers_on_page_static_and_api(world: World) -> None:
    suite = world.suite
    expected = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }
    caching = {
        "/": "no-cache",
        "/static/app.js": "no-cache",
        "/static/app.css": "no-cache",
        "/api/config": "no-store",
        "/api/no-such-route": "no-store",
        "/healthz": None,
    }
    async with aiohttp.ClientSession() as session:
        for path, cache in caching.items():
            async with session.get(suite.gateway.url + path) as reply:
                await reply.read()
                for name, value in expected.items():
                    assert reply.headers.get(name) == value, (path, name)
                if cache is not None:
                    assert reply.headers.get("Cache-Control") == cache, path
    policy = {
        part.split(" ")[0]: part.partition(" ")[2] for part in CONTENT_SECURITY_POLICY.split("; ")
    }
    assert policy["script-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert policy["default-src"] == "'self'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


class _PageAudit(HTMLParser):
    """Everything in the page that a `script-src 'self'; style-src 'self'` policy would block."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script":
            self._in_script = True
            if not (names.get("src") or "").startswith("/static/"):
                self.problems.append(f"<script> without a /static/ src: {attrs}")
        if tag == "style":
            self.problems.append("<style> element")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"inline handler {name} on <{tag}>")
            if name == "style":
                self.problems.append(f"style attribute on <{tag}>")
            if value and value.strip().lower().startswith("javascript:"):
                self.problems.append(f"javascript: URL on <{tag}>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.problems.append(f"inline script: {data.strip()[:60]!r}")


def test_the_page_has_no_inline_script_or_style() -> None:
    audit = _PageAudit()
    audit.feed((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
    assert audit.problems == []
    # and the audit itself finds each of them
    probe = _PageAudit()
    probe.feed(
        '<script>alert(1)</script><div onclick="x()" style="color:red">'
        '<a href="javascript:x()">x</a></div><style>p{}</style><script src="https://cdn/x.js">'
    )
    assert len(probe.problems) == 7, probe.problems


_SECRETS = ("token", "admin_token", "report_token", "tokens", "header", "offered", "secret")


def _secretish(node: ast.AST) -> bool:
    name = ""
    if isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute):
        name = node.attr
    return name.lower() in _SECRETS or name.lower().endswith(("_token", "_secret"))


def test_tokens_are_compared_only_in_constant_time() -> None:
    """No `==`, `!=` or `in` on a token anywhere in the services or the gateway: every check
    goes through `token_matches` (hmac.compare_digest)."""
    offenders = []
    files = [*REPO.joinpath("gateway").rglob("*.py"), *REPO.joinpath("services").rglob("*.py")]
    for file in files:
        if file.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops
            ):
                operands = [node.left, *node.comparators]
                if any(_secretish(operand) for operand in operands) and not any(
                    isinstance(operand, ast.Constant) and operand.value is None
                    for operand in operands
                ):
                    offenders.append(f"{file.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
    probe = ast.parse("if header == admin_token: pass")
    assert any(isinstance(n, ast.Compare) and _secretish(n.left) for n in ast.walk(probe))


def test_token_matches_rules() -> None:
    from services.api.runtime import token_matches

    assert token_matches(f"Bearer {ADMIN}", [ADMIN])
    assert token_matches(f"Bearer {REPORTER}", [None, ADMIN, REPORTER])
    for header in bad_authorizations(admin_only=True):
        assert not token_matches(header, [ADMIN]), header
    assert not token_matches("Bearer ", ["", None])  # an unset token matches nothing
    assert not token_matches("Bearer \udcff", [ADMIN])  # an undecodable header does not raise
