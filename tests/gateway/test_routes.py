"""Every REST route of the gateway against the real services: shapes (validated against
/api/openapi.json), auth, and every kind of bad input answered with a documented 4xx."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate as validate_openapi

from gateway.openapi import build_document
from gateway.settings import STATIC_DIR as STATIC
from services.api import training_pb2
from services.core.training_config import START_OPTIONS, get_config
from tests.gateway.conftest import (
    ADMIN,
    ADMIN_HEADERS,
    MODELS,
    REPORT_HEADERS,
    GatewayFactory,
    Suite,
    answer,
    start_run,
    wait_finished,
)

pytestmark = pytest.mark.slow
Client = TestClient[web.Request, web.Application]
UNKNOWN_RUN = "run-20000101-000000"


def good_start(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "datasetId": "small",
        "baseModels": MODELS,
        "epochs": 1,
        "refreshInterval": 0.05,
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


# ---- the document itself ------------------------------------------------------------------------


async def test_openapi_is_valid_and_lists_every_route(gateway: Client) -> None:
    document = await answer(await gateway.get("/api/openapi.json"), 200)
    validate_openapi(document)
    assert document == json.loads(json.dumps(build_document()))
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in gateway.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops}
    # the static files are the page's, not an API route
    assert {r for r in served if not r[1].startswith("/static")} == documented


# ---- reads --------------------------------------------------------------------------------------


async def test_config_is_the_training_config_and_the_start_options(gateway: Client) -> None:
    config = await answer(await gateway.get("/api/config"), 200)
    options = config.pop("start_options")
    generate = config.pop("generate_options")
    assert config == get_config()
    assert [o["name"] for o in generate] == ["maxNewTokens", "temperature", "topP", "seed"]
    tokens = generate[0]
    assert tokens["default"] == get_config()["generation"]["max_new_tokens"]
    assert tokens["schema"]["minimum"] == 1
    assert [o["name"] for o in options] == [o.camel for o in START_OPTIONS]
    epochs = next(o for o in options if o["name"] == "epochs")
    limits = get_config()["limits"]
    assert epochs["default"] == get_config()["defaults"]["epochs"]
    assert epochs["schema"]["maximum"] == limits["max_epochs"] and epochs["group"] == "training"
    method = next(o for o in options if o["name"] == "method")
    assert [c["value"] for c in method["choices"]] == ["lora", "full"]


async def test_models_and_datasets(gateway: Client) -> None:
    models = await answer(await gateway.get("/api/admin/models", headers=ADMIN_HEADERS), 200)
    names = {m["name"] for m in models["models"]}
    assert set(MODELS) <= names
    assert all(m["parameter_count"] > 0 and m["architecture"] for m in models["models"])
    datasets = await answer(await gateway.get("/api/admin/datasets", headers=ADMIN_HEADERS), 200)
    assert datasets == {"datasets": [{"id": "small", "records": 60}]}


async def test_run_reads(gateway: Client, finished_run: str) -> None:
    runs = await answer(await gateway.get("/api/training/runs"), 200)
    mine = next(r for r in runs["runs"] if r["run_id"] == finished_run)
    assert mine["status"] == "completed" and mine["base_models"] == MODELS
    assert mine["dataset_id"] == "small" and mine["dna"]
    ids = [r["run_id"] for r in runs["runs"]]
    assert ids == sorted(ids, reverse=True)  # newest first

    metrics = await answer(await gateway.get(f"/api/training/{finished_run}/metrics"), 200)
    assert metrics["run_id"] == finished_run and metrics["status"] == "completed"
    assert [e["epoch"] for e in metrics["training_history"]] == [1, 2]
    assert metrics["progress_percent"] == 100
    assert set(metrics["val_losses"]) == set(MODELS)

    board = await answer(await gateway.get(f"/api/training/{finished_run}/leaderboard"), 200)
    losses = [row["val_loss"] for row in board["leaderboard"]]
    assert losses == sorted(losses)
    assert [row["rank"] for row in board["leaderboard"]] == [1, 2]
    assert board["leaderboard"][0]["val_loss"] == min(metrics["val_losses"].values())

    path = "/api/training/{runId}/artifacts/{name}"
    dna = await answer(
        await gateway.get(f"/api/training/{finished_run}/artifacts/oneseek_dna.json"),
        200,
        path=path,
    )
    assert dna["dna"] == mine["dna"]


async def test_active_and_status_while_a_run_trains(gateway: Client, suite: Suite) -> None:
    run_id = start_run(suite, epochs=30)
    try:
        active = await answer(await gateway.get("/api/training/active"), 200)
        status = await answer(
            await gateway.get("/api/admin/training/status", headers=ADMIN_HEADERS), 200
        )
        assert [r["run_id"] for r in status["active"]] == [run_id]
        assert status["active"][0]["config"]["base_models"] == MODELS
        assert status["max_active_runs"] == 1
        # the metrics service learns of the run from its first event or a lookup: either way
        # it is running
        assert all(r["status"] == "running" for r in active["runs"])
        # metrics exist from the moment the run starts
        metrics = await answer(await gateway.get(f"/api/training/{run_id}/metrics"), 200)
        assert metrics["status"] == "running"

        busy = await gateway.post(
            "/api/admin/training/start-dna-v2", json=good_start(), headers=ADMIN_HEADERS
        )
        error = await answer(busy, 409)
        assert error["error"] == "conflict" and run_id in error["message"]
    finally:
        stopped = await gateway.post(f"/api/admin/training/{run_id}/stop", headers=ADMIN_HEADERS)
        body = await answer(stopped, 200, method="post")
        assert body == {"success": True, "runId": run_id, "status": "running"}
    assert wait_finished(suite, run_id).status == training_pb2.RUN_STATUS_STOPPED
    again = await gateway.post(f"/api/admin/training/{run_id}/stop", headers=ADMIN_HEADERS)
    assert (await answer(again, 409))["error"] == "conflict"


async def test_start_through_the_gateway(gateway: Client, suite: Suite) -> None:
    wait_idle(suite)
    response = await gateway.post(
        "/api/admin/training/start-dna-v2",
        json=good_start(method="lora", seed=7, learningRate=1e-3, loraRank=4),
        headers=ADMIN_HEADERS,
    )
    accepted = await answer(response, 202, method="post")
    assert accepted["success"] is True and accepted["status"] == "running"
    run_id = accepted["runId"]
    # listed at once, long before the worker has loaded its models and sent a first event
    runs = await answer(await gateway.get("/api/training/runs"), 200)
    listed = next(r for r in runs["runs"] if r["run_id"] == run_id)
    assert listed["status"] == "running" and listed["last_seq"] == 0
    summary = wait_finished(suite, run_id)
    assert summary.status == training_pb2.RUN_STATUS_COMPLETED
    metrics = await answer(await gateway.get(f"/api/training/{run_id}/metrics"), 200)
    assert metrics["training_history"][0]["lr_multipliers"]  # trained with our request


def wait_idle(suite: Suite) -> None:
    running = training_pb2.ListRunsRequest(status=training_pb2.RUN_STATUS_RUNNING)
    for run in suite.training_stub().ListRuns(running, timeout=5).runs:
        wait_finished(suite, run.run_id)


async def test_resume_refuses_a_completed_run_and_an_unknown_one(
    gateway: Client, finished_run: str
) -> None:
    response = await gateway.post(
        f"/api/admin/training/{finished_run}/resume", headers=ADMIN_HEADERS
    )
    refused = await answer(response, 409, method="post")
    assert refused["error"] == "conflict" and "completed" in refused["message"]
    unknown = await gateway.post(f"/api/admin/training/{UNKNOWN_RUN}/resume", headers=ADMIN_HEADERS)
    assert (await answer(unknown, 404, method="post"))["error"] == "not_found"
    bad = await gateway.post("/api/admin/training/run-1:2/resume", headers=ADMIN_HEADERS)
    assert (await answer(bad, 400, method="post"))["error"] == "bad_request"


async def test_report_metrics(gateway: Client) -> None:
    run_id = "run-20010101-000000"
    path = f"/api/training/{run_id}/metrics"
    body = {
        "epoch": 1,
        "total_epochs": 2,
        "val_losses": {"outside-a": 2.5, "outside-b": 2.0},
        "weights": {"outside-a": 0.8, "outside-b": 1.2},
    }
    first = await answer(
        await gateway.post(path, json=body, headers=REPORT_HEADERS),
        200,
        method="post",
    )
    assert first == {"success": True, "seq": 1}
    # the same report again is a retry: same seq, nothing stored twice
    retry = await gateway.post(path, json=body, headers=ADMIN_HEADERS)
    assert (await retry.json()) == first
    changed = await gateway.post(
        path,
        json={**body, "val_losses": {"outside-a": 9.0, "outside-b": 2.0}},
        headers=REPORT_HEADERS,
    )
    assert (await answer(changed, 409))["error"] == "conflict"
    last = await gateway.post(
        path,
        json={"epoch": 2, "val_losses": {"outside-a": 2.1, "outside-b": 1.9}},
        headers=REPORT_HEADERS,
    )
    assert (await last.json())["seq"] == 2
    metrics = await answer(await gateway.get(path), 200)
    assert metrics["status"] == "completed" and metrics["current_epoch"] == 2
    assert metrics["weights"]["outside-b"] == 1.2
    board = await answer(await gateway.get(f"/api/training/{run_id}/leaderboard"), 200)
    assert [r["model_name"] for r in board["leaderboard"]] == ["outside-b", "outside-a"]


async def test_healthz_ok(gateway: Client) -> None:
    health = await answer(await gateway.get("/healthz"), 200)
    assert health == {"status": "ok", "training": True, "metrics": True}


# ---- auth ---------------------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("get", "/api/admin/models"),
    ("get", "/api/admin/datasets"),
    ("get", "/api/admin/training/status"),
    ("post", "/api/admin/training/start-dna-v2"),
    ("post", f"/api/admin/training/{UNKNOWN_RUN}/stop"),
    ("post", f"/api/admin/training/{UNKNOWN_RUN}/resume"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}, REPORT_HEADERS],
    ids=["missing", "wrong", "not-bearer", "report-token"],
)
async def test_admin_routes_need_the_admin_token(
    gateway: Client, method: str, path: str, headers: dict[str, str]
) -> None:
    response = await gateway.request(method, path, headers=headers, json=good_start())
    error = await answer(response, 401)
    assert error["error"] == "unauthorized" and "Bearer" in error["message"]


async def test_admin_routes_with_the_admin_token_pass_auth(gateway: Client) -> None:
    response = await gateway.post(f"/api/admin/training/{UNKNOWN_RUN}/stop", headers=ADMIN_HEADERS)
    assert (await answer(response, 404))["error"] == "not_found"  # past auth, at the service


@pytest.mark.parametrize(
    ("run_id", "headers", "status"),
    [
        ("run-20020202-000001", {}, 401),
        ("run-20020202-000002", {"Authorization": "Bearer wrong"}, 401),
        ("run-20020202-000003", REPORT_HEADERS, 200),
        ("run-20020202-000004", ADMIN_HEADERS, 200),
    ],
)
async def test_report_route_takes_either_token(
    gateway: Client, run_id: str, headers: dict[str, str], status: int
) -> None:
    body = {"epoch": 1, "val_losses": {"m": 1.0}}
    response = await gateway.post(f"/api/training/{run_id}/metrics", json=body, headers=headers)
    await answer(response, status, method="post")


async def test_reads_are_open_on_loopback_but_not_elsewhere(
    make_gateway: GatewayFactory, finished_run: str
) -> None:
    local = await make_gateway()
    assert (await local.get("/api/training/runs")).status == 200
    # a page on another site, reaching the gateway by DNS rebinding, carries its own Host
    rebound = await local.get("/api/training/runs", headers={"Host": "evil.example:3001"})
    assert (await answer(rebound, 403))["error"] == "forbidden"
    with_token = await local.get(
        "/api/training/runs", headers={"Host": "evil.example:3001", **ADMIN_HEADERS}
    )
    assert with_token.status == 200

    # listening on every interface: reads need the admin token
    public = await make_gateway(host="0.0.0.0")
    for path in ("/api/training/runs", f"/api/training/{finished_run}/metrics", "/api/config"):
        assert (await answer(await public.get(path), 401))["error"] == "unauthorized"
        wrong = await public.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        assert (await public.get(path, headers=ADMIN_HEADERS)).status == 200
    # liveness, the document and the page stay open
    for path in ("/healthz", "/api/openapi.json", "/"):
        assert (await public.get(path)).status == 200


async def test_without_an_admin_token_admin_routes_are_open_locally_only(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(admin_token=None, report_token=None)
    models = await gateway.get("/api/admin/models")
    assert models.status == 200
    rebound = await gateway.get("/api/admin/models", headers={"Host": "attacker.example"})
    assert rebound.status == 403
    # the services still hold a token: the gateway says it is a configuration problem
    start = await gateway.post("/api/admin/training/start-dna-v2", json=good_start())
    error = await answer(start, 401)
    assert "ONESEEK_ADMIN_TOKEN" in error["message"]


async def test_cross_site_posts_are_refused(gateway: Client) -> None:
    response = await gateway.post(
        "/api/admin/training/start-dna-v2",
        json=good_start(),
        headers={**ADMIN_HEADERS, "Origin": "https://evil.example"},
    )
    assert (await answer(response, 403))["error"] == "forbidden"
    same = await gateway.post(
        f"/api/admin/training/{UNKNOWN_RUN}/stop",
        headers={**ADMIN_HEADERS, "Origin": f"http://{gateway.host}:{gateway.port}"},
    )
    assert same.status == 404  # same origin: past the check


# ---- bad input ----------------------------------------------------------------------------------

BAD_RUN_IDS = [
    ("run-1:2", 400),
    ("run-20260101-120000:1", 400),
    ("..%2F..%2Fetc", 400),
    ("run-20260101-120000%2F..", 400),
    ("run-2026Ol01-120000", 400),
    ("run-20260101-120000-", 400),
    ("run-20260101-120000%0A", 400),
    ("run-%EF%BC%92%EF%BC%90260101-120000", 400),  # full-width digits
    ("%00", 400),
    # a bare ".." segment is resolved by the URL itself: no route is left to match
    ("..", 404),
    ("%2E%2E", 404),
]


@pytest.mark.parametrize(("run_id", "status"), BAD_RUN_IDS)
@pytest.mark.parametrize(
    ("method", "template", "headers"),
    [
        ("get", "/api/training/{}/metrics", {}),
        ("get", "/api/training/{}/leaderboard", {}),
        ("get", "/api/training/{}/artifacts/oneseek_dna.json", {}),
        ("post", "/api/training/{}/metrics", REPORT_HEADERS),
        ("post", "/api/admin/training/{}/stop", ADMIN_HEADERS),
        ("post", "/api/admin/training/{}/resume", ADMIN_HEADERS),
    ],
)
async def test_bad_run_ids_are_refused_before_any_service(
    make_gateway: GatewayFactory,
    run_id: str,
    status: int,
    method: str,
    template: str,
    headers: dict[str, str],
) -> None:
    # services that do not exist: a 400 proves nothing was asked of them
    gateway = await make_gateway(training_addr="127.0.0.1:9", metrics_addr="127.0.0.1:9")
    response = await gateway.request(
        method, template.format(run_id), headers=headers, json={"epoch": 1, "val_losses": {"m": 1}}
    )
    error = await answer(response, status)
    if status == 400:
        assert error["field"] == "runId" and "run-YYYYMMDD-HHMMSS" in error["message"]
    else:
        assert error["error"] == "not_found"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (f"/api/training/{UNKNOWN_RUN}/metrics", {}),
        (f"/api/training/{UNKNOWN_RUN}/leaderboard", {}),
        (f"/api/training/{UNKNOWN_RUN}/artifacts/oneseek_dna.json", {}),
        ("/api/nothing-here", {}),
    ],
)
async def test_unknown_things_are_404(gateway: Client, path: str, headers: dict[str, str]) -> None:
    error = await answer(await gateway.get(path, headers=headers), 404)
    assert error["error"] == "not_found" and error["message"]


async def test_unknown_artifact_name(gateway: Client, finished_run: str) -> None:
    for name in ("events.jsonl", "run.json", "x"):
        response = await gateway.get(f"/api/training/{finished_run}/artifacts/{name}")
        error = await answer(response, 400)
        assert error["field"] == "name"


async def test_method_not_allowed_is_json(gateway: Client) -> None:
    response = await gateway.delete("/api/config")
    error = await answer(response, 405)
    assert error["error"] == "method_not_allowed" and "GET" in error["message"]
    assert "GET" in response.headers["Allow"]


START = "/api/admin/training/start-dna-v2"


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        (good_start(baseModels=[]), 400, "baseModels", "No base models selected"),
        (good_start(baseModels=...), 400, "baseModels", "No base models selected"),
        (good_start(baseModels=["tiny-llama", "tiny-llama"]), 400, "baseModels", "twice"),
        (good_start(baseModels=["../etc"]), 400, "baseModels", "not valid"),
        (good_start(baseModels="tiny-llama"), 400, "baseModels", "list"),
        (good_start(baseModels=[f"m{i}" for i in range(11)]), 400, "baseModels", "at most 10"),
        (good_start(baseModels=["no-such-model"]), 404, "baseModels", "tiny-llama"),
        (good_start(datasetId="no-such-dataset"), 404, "datasetId", "no-such-dataset"),
        (good_start(datasetId=...), 400, "datasetId", "required"),
        (good_start(datasetId="../../etc/passwd"), 400, "datasetId", "not valid"),
        (good_start(datasetId=7), 400, "datasetId", "not valid"),
        (good_start(epochs=0), 400, "epochs", "from 1 to 100"),
        (good_start(epochs=101), 400, "epochs", "from 1 to 100"),
        (good_start(epochs=2**70), 400, "epochs", "from 1 to 100"),
        (good_start(epochs="3"), 400, "epochs", "whole number"),
        (good_start(epochs=2.0), 400, "epochs", "whole number"),
        (good_start(epochs=True), 400, "epochs", "whole number"),
        (good_start(learningRate=0), 400, "learningRate", "above 0"),
        (good_start(learningRate=-1e-4), 400, "learningRate", "above 0"),
        (good_start(learningRate="fast"), 400, "learningRate", "finite number"),
        (good_start(autoStopThreshold=-0.1), 400, "autoStopThreshold", "at least 0"),
        (good_start(autoStopPatience=0), 400, "autoStopPatience", "from 1"),
        (good_start(minEpochs=0), 400, "minEpochs", "from 1"),
        (good_start(batchSize=0), 400, "batchSize", "from 1"),
        (good_start(seed=-1), 400, "seed", "from 0"),
        (good_start(method="qlora"), 400, "method", "lora, full"),
        (good_start(loraRank=0), 400, "loraRank", "from 1"),
        (good_start(maxSeqLength=4), 400, "maxSeqLength", "from 8"),
        (good_start(validationSplit=1), 400, "validationSplit", "below 1"),
        (good_start(refreshInterval=0), 400, "refreshInterval", "above 0"),
        (good_start(modelz=["x"]), 400, "modelz", "Unknown field"),
        (good_start(dataset_id="small"), 400, "dataset_id", "Unknown field"),
        ([], 400, "body", "JSON object"),
        ("start", 400, "body", "JSON object"),
        (None, 400, "body", "JSON object"),
    ],
)
async def test_bad_start_bodies(
    gateway: Client, body: Any, status: int, field: str, words: str
) -> None:
    response = await gateway.post(START, json=body, headers=ADMIN_HEADERS)
    error = await answer(response, status)
    assert error["field"] == field, error
    assert words in error["message"], error


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "empty"),
        (b"{", "not valid JSON"),
        (b'{"datasetId": "small",}', "not valid JSON"),
        (b'{"datasetId": "small", "datasetId": "other"}', "appears twice"),
        (b'{"datasetId": "small", "baseModels": ["tiny-llama"], "learningRate": NaN}', "NaN"),
        (b'{"datasetId": "small", "baseModels": ["tiny-llama"], "epochs": Infinity}', "Infinity"),
        (
            b'{"datasetId": "small", "baseModels": ["tiny-llama"], "epochs": ' + b"9" * 5000 + b"}",
            "acceptable",
        ),
        (
            b'{"datasetId": "small", "baseModels": ["tiny-llama"], "learningRate": 1e999}',
            "learningRate",
        ),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "acceptable"),
    ],
)
async def test_malformed_json(gateway: Client, raw: bytes, words: str) -> None:
    response = await gateway.post(
        START, data=raw, headers={**ADMIN_HEADERS, "Content-Type": "application/json"}
    )
    error = await answer(response, 400)
    assert words in error["message"], error


async def test_oversized_bodies_are_413(gateway: Client) -> None:
    big = {"datasetId": "small", "baseModels": MODELS, "padding": "x" * (2 * 1024 * 1024)}
    for path, headers in (
        (START, ADMIN_HEADERS),
        (f"/api/training/{UNKNOWN_RUN}/metrics", REPORT_HEADERS),
    ):
        response = await gateway.post(
            path,
            data=io.BytesIO(json.dumps(big).encode()),
            headers={**headers, "Content-Type": "application/json"},
        )
        error = await answer(response, 413)
        assert error["error"] == "payload_too_large" and "bytes" in error["message"]


REPORT = f"/api/training/{UNKNOWN_RUN}/metrics"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"val_losses": {"m": 1.0}}, "epoch"),
        ({"epoch": 1}, "val_losses"),
        ({"epoch": 0, "val_losses": {"m": 1.0}}, "epoch"),
        ({"epoch": "1", "val_losses": {"m": 1.0}}, "epoch"),
        ({"epoch": 2**80, "val_losses": {"m": 1.0}}, "epoch"),
        ({"epoch": 1, "val_losses": {}}, "val_losses"),
        ({"epoch": 1, "val_losses": [1.0]}, "val_losses"),
        ({"epoch": 1, "val_losses": {"m": "low"}}, "val_losses"),
        ({"epoch": 1, "val_losses": {"../m": 1.0}}, "val_losses"),
        ({"epoch": 1, "val_losses": {f"m{i}": 1.0 for i in range(101)}}, "val_losses"),
        ({"epoch": 1, "val_losses": {"m": 1.0}, "weights": {"other": 1.0}}, "weights"),
        ({"epoch": 1, "val_losses": {"m": 1.0}, "weights": {"m": 0}}, "weights"),
        ({"epoch": 1, "val_losses": {"m": 1.0}, "progress_percent": 101}, "progress_percent"),
        ({"epoch": 2, "val_losses": {"m": 1.0}, "total_epochs": 1}, "total_epochs"),
        ({"epoch": 1, "val_losses": {"m": 1.0}, "auto_stop_info": {"x": 1}}, "auto_stop_info"),
        ({"epoch": 1, "val_losses": {"m": 1.0}, "auto_stop_info": []}, "auto_stop_info"),
        (
            {"epoch": 1, "val_losses": {"m": 1.0}, "auto_stop_info": {"patience": -1}},
            "auto_stop_info.patience",
        ),
        ({"epoch": 1, "val_losses": {"m": 1.0}, "valLosses": {}}, "valLosses"),
    ],
)
async def test_bad_reports(gateway: Client, body: dict[str, Any], field: str) -> None:
    error = await answer(await gateway.post(REPORT, json=body, headers=REPORT_HEADERS), 400)
    assert error["field"] == field, error


# ---- the page -----------------------------------------------------------------------------------


async def test_page_and_security_headers(gateway: Client) -> None:
    page = await gateway.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    for path in ("/api/config", "/api/nothing"):
        response = await gateway.get(path)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    # JavaScript modules must come with a JavaScript type: under nosniff nothing else runs
    types = {
        ".js": ("text/javascript", "application/javascript"),
        ".css": ("text/css",),
        ".svg": ("image/svg+xml",),
    }
    for asset in sorted(STATIC.iterdir()):
        if asset.suffix in types:
            response = await gateway.get(f"/static/{asset.name}")
            assert response.status == 200 and response.content_type in types[asset.suffix]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    traversal = await gateway.get("/static/../app.py")
    assert traversal.status in (403, 404)
    assert "create_app" not in await traversal.text()
