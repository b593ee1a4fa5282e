"""Bad input, everywhere: a table of bad requests against the real training service, metrics
service and gateway, over REST, the websocket and gRPC.

Every row gets its documented 4xx (with the `{"error", "message", "field"}` envelope) or gRPC
status (with the field in the `oneseek-field` trailing metadata), a message that names the field
or the problem, never a 5xx; after each row all three processes still answer; at the end no
file exists outside MODELS_DIR that was not there before, no run was created, nothing escaped
through `..` or an absolute path, and no log holds a traceback.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket as socket_module
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import grpc
import pytest
import torch
from google.protobuf.message import Message
from yarl import URL

from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from services.api.runtime import FIELD_METADATA_KEY
from tests.conftest import long_records
from tests.faults.suite import ADMIN, REPORTER, Suite, running_suite, tree

pytestmark = pytest.mark.slow

MARK = "escape-marker-5c1f"
"""Every name that tries to leave MODELS_DIR or DATASETS_DIR carries this, so the end can look
for it anywhere it could have landed."""
UNKNOWN_RUN = "run-20260101-120000"
START = "/api/admin/training/start-dna-v2"
REPORT = f"/api/training/{UNKNOWN_RUN}/metrics"
DROP = object()


# ---- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rest:
    name: str
    method: str
    path: str
    body: bytes | None
    status: int
    field: str | None
    words: tuple[str, ...]
    """Each must appear in the message (case-insensitive): the field or the problem."""
    token: str = ADMIN
    envelope: bool = True
    """False: malformed HTTP, refused by aiohttp's parser in plain text before any handler."""


@dataclass(frozen=True)
class Socket:
    name: str
    query: str
    words: tuple[str, ...]
    """Empty: the server closes 1008 without a message (no runId at all)."""


@dataclass(frozen=True)
class Rpc:
    name: str
    service: str
    method: str
    request: Message
    code: grpc.StatusCode
    field: str | None
    words: tuple[str, ...]
    stream: bool = False
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {ADMIN}"),)


@dataclass(frozen=True)
class Raw:
    """Bytes no HTTP client library would send (undecodable headers)."""

    name: str
    head: bytes
    status: int
    error: str
    words: tuple[str, ...]


Row = Rest | Socket | Rpc | Raw


def start(**changes: Any) -> bytes:
    """A start body that is good except for `changes` (DROP removes a field)."""
    body: dict[str, Any] = {"datasetId": "small", "baseModels": ["tiny-llama"], "epochs": 1}
    for key, value in changes.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return json.dumps(body).encode()


def bad_start(name: str, field: str, words: tuple[str, ...], **changes: Any) -> Rest:
    return Rest(name, "POST", START, start(**changes), 400, field, words)


def bad_report(name: str, field: str, body: dict[str, Any], *words: str) -> Rest:
    return Rest(name, "POST", REPORT, json.dumps(body).encode(), 400, field, words, REPORTER)


GOOD_REPORT = {"epoch": 1, "val_losses": {"external-model": 2.5}}

REST_ROWS: list[Rest] = [
    # malformed bodies
    Rest(
        "json-truncated", "POST", START, b'{"datasetId": "small",', 400, "body", ("not valid json",)
    ),
    Rest("json-array", "POST", START, b"[]", 400, "body", ("json object",)),
    Rest("json-empty", "POST", START, b"", 400, "body", ("empty",)),
    Rest("json-not-utf8", "POST", START, b'{"datasetId": "\xff\xfe"}', 400, "body", ("utf-8",)),
    Rest(
        "json-nan", "POST", START, start()[:-1] + b', "learningRate": NaN}', 400, "body", ("nan",)
    ),
    Rest(
        "json-infinity",
        "POST",
        START,
        start()[:-1] + b', "epochs2": -Infinity}',
        400,
        "body",
        ("infinity",),
    ),
    Rest(
        "json-5000-digit-int",
        "POST",
        START,
        start()[:-1] + b', "seed": ' + b"9" * 5000 + b"}",
        400,
        "body",
        ("acceptable json",),
    ),
    Rest(
        "json-deep-nesting", "POST", START, b"[" * 100_000 + b"]" * 100_000, 400, "body", ("json",)
    ),
    Rest(
        "duplicate-key",
        "POST",
        START,
        b'{"datasetId": "small", "datasetId": "other", "baseModels": ["tiny-llama"]}',
        400,
        "datasetId",
        ("twice",),
    ),
    Rest(
        "body-10-mb",
        "POST",
        START,
        b'{"datasetId": "' + b"a" * 10_000_000 + b'"}',
        413,
        None,
        ("larger than",),
    ),
    # wrong types, out of range, unknown fields
    bad_start("unknown-field", "fooBar", ("unknown field", "foobar"), fooBar=1),
    bad_start("missing-dataset", "datasetId", ("datasetid", "required"), datasetId=DROP),
    bad_start("dataset-number", "datasetId", ("dataset id",), datasetId=42),
    bad_start("epochs-string", "epochs", ("epochs", "whole number"), epochs="3"),
    bad_start("epochs-float", "epochs", ("epochs", "whole number"), epochs=3.0),
    bad_start("epochs-bool", "epochs", ("epochs",), epochs=True),
    bad_start("epochs-zero", "epochs", ("epochs", "from 1 to 100"), epochs=0),
    bad_start("epochs-negative", "epochs", ("epochs", "from 1 to 100"), epochs=-5),
    bad_start("epochs-huge", "epochs", ("epochs", "from 1 to 100"), epochs=10**30),
    bad_start(
        "learning-rate-negative", "learningRate", ("learningrate", "above 0"), learningRate=-1e-4
    ),
    bad_start("learning-rate-zero", "learningRate", ("learningrate",), learningRate=0),
    # 1e400 is valid JSON that Python reads as infinity
    Rest(
        "learning-rate-overflow",
        "POST",
        START,
        start()[:-1] + b', "learningRate": 1e400}',
        400,
        "learningRate",
        ("learningrate", "finite"),
    ),
    bad_start("seed-negative", "seed", ("seed",), seed=-1),
    bad_start("seed-beyond-uint32", "seed", ("seed",), seed=2**32),
    bad_start("method-unknown", "method", ("method", "lora"), method="qlora"),
    bad_start("precision-unknown", "precision", ("precision", "bf16"), precision="fp8"),
    bad_start(
        "quantization-4bit-full", "quantization", ("lora",), method="full", quantization="4bit"
    ),
    bad_start(
        "checkpointing-not-a-flag",
        "gradientCheckpointing",
        ("gradientCheckpointing",),
        gradientCheckpointing="yes",
    ),
    # batch 1024 x 4096 tokens: tens of GB of activations, refused by the memory plan
    bad_start(
        "too-big-to-fit",
        "baseModels",
        ("tiny-llama", "needs about", "would fit with"),
        datasetId="long",
        batchSize=1024,
        maxSeqLength=4096,
    ),
    *(
        [
            bad_start("fp16-without-cuda", "precision", ("fp16", "cuda"), precision="fp16"),
            bad_start("4bit-without-cuda", "quantization", ("4bit", "cuda"), quantization="4bit"),
        ]
        if not torch.cuda.is_available()
        else []
    ),
    bad_start("batch-size-huge", "batchSize", ("batchsize",), batchSize=10**9),
    bad_start("max-seq-length-tiny", "maxSeqLength", ("maxseqlength",), maxSeqLength=4),
    bad_start("lora-dropout-one", "loraDropout", ("loradropout",), loraDropout=1.0),
    bad_start("validation-split-zero", "validationSplit", ("validationsplit",), validationSplit=0),
    bad_start(
        "threshold-negative", "autoStopThreshold", ("autostopthreshold",), autoStopThreshold=-0.1
    ),
    bad_start("patience-zero", "autoStopPatience", ("autostoppatience",), autoStopPatience=0),
    # model lists
    bad_start("models-empty", "baseModels", ("no base models selected",), baseModels=[]),
    bad_start("models-missing", "baseModels", ("no base models selected",), baseModels=DROP),
    bad_start("models-not-a-list", "baseModels", ("list",), baseModels="tiny-llama"),
    bad_start("models-duplicate", "baseModels", ("twice",), baseModels=["tiny-llama"] * 2),
    bad_start(
        "models-eleven", "baseModels", ("too many",), baseModels=[f"m{i}" for i in range(11)]
    ),
    bad_start("models-number", "baseModels", ("not valid",), baseModels=[7]),
    bad_start("models-dotdot", "baseModels", ("not valid", "path"), baseModels=[f"../{MARK}"]),
    bad_start(
        "models-dotdot-deep", "baseModels", ("not valid",), baseModels=[f"tiny-llama/../../{MARK}"]
    ),
    bad_start("models-absolute", "baseModels", ("not valid",), baseModels=[f"/tmp/{MARK}"]),
    bad_start(
        "models-unicode-hyphen", "baseModels", ("not valid",), baseModels=["tiny\u2010llama"]
    ),
    bad_start("models-zero-width", "baseModels", ("not valid",), baseModels=["tiny-llama\u200b"]),
    bad_start("models-fullwidth", "baseModels", ("not valid",), baseModels=["ｔｉｎｙ-llama"]),
    bad_start("models-rtl-override", "baseModels", ("not valid",), baseModels=["\u202eamall-ynit"]),
    bad_start("models-nul-byte", "baseModels", ("not valid",), baseModels=["tiny\x00llama"]),
    bad_start("models-name-129-chars", "baseModels", ("not valid", "128"), baseModels=["m" * 129]),
    bad_start("seed-float", "seed", ("seed", "whole number"), seed=1e2),
    bad_start("models-dot-only", "baseModels", ("not valid",), baseModels=[".."]),
    Rest(
        "models-not-found",
        "POST",
        START,
        start(baseModels=["no-such-model"]),
        404,
        "baseModels",
        ("no-such-model", "not found", "available"),
    ),
    # datasets
    bad_start("dataset-dotdot", "datasetId", ("not valid",), datasetId=f"../../{MARK}"),
    bad_start("dataset-absolute", "datasetId", ("not valid",), datasetId=f"/tmp/{MARK}"),
    bad_start("dataset-backslash", "datasetId", ("not valid",), datasetId=f"..\\{MARK}"),
    bad_start("dataset-unicode-dots", "datasetId", ("not valid",), datasetId="\u2025/etc"),
    Rest(
        "dataset-not-found",
        "POST",
        START,
        start(datasetId="no-such-data"),
        404,
        "datasetId",
        ("no-such-data", "not found", "available"),
    ),
    # run ids in every path
    Rest(
        "run-id-short",
        "GET",
        "/api/training/run-2026/metrics",
        None,
        400,
        "runId",
        ("run id", "run-yyyymmdd-hhmmss"),
    ),
    Rest(
        "run-id-colons",
        "GET",
        "/api/training/run-20260101-12:00:00/metrics",
        None,
        400,
        "runId",
        ("run id",),
    ),
    Rest(
        "run-id-dotdot-encoded",
        "GET",
        f"/api/training/..%2F..%2F{MARK}/leaderboard",
        None,
        400,
        "runId",
        ("run id",),
    ),
    Rest("run-id-dotdot", "GET", "/api/training/../leaderboard", None, 400, "runId", ("run id",)),
    Rest(
        "run-id-unicode-digits",
        "GET",
        "/api/training/" + quote("run-２０２６０１０１-１２００００") + "/leaderboard",
        None,
        400,
        "runId",
        ("ascii",),
    ),
    # raw UTF-8 in the request line is malformed HTTP: aiohttp's parser answers before any
    # handler, in plain text (and the gateway logs one line, no traceback)
    Rest(
        "run-id-raw-utf8-in-request-line",
        "GET",
        "/api/training/run-２０２６０１０１-１２００００/leaderboard",
        None,
        400,
        None,
        ("invalid char",),
        envelope=False,
    ),
    Rest(
        "run-id-newline",
        "GET",
        f"/api/training/{UNKNOWN_RUN}%0A/metrics",
        None,
        400,
        "runId",
        ("run id",),
    ),
    Rest(
        "run-id-long",
        "GET",
        f"/api/training/run-{'1' * 2000}/metrics",
        None,
        400,
        "runId",
        ("run id",),
    ),
    Rest(
        "run-id-unknown-metrics",
        "GET",
        f"/api/training/{UNKNOWN_RUN}/metrics",
        None,
        404,
        "runId",
        (UNKNOWN_RUN, "not known"),
    ),
    Rest(
        "stop-run-id-traversal",
        "POST",
        f"/api/admin/training/..%2F{MARK}/stop",
        None,
        400,
        "runId",
        ("run id",),
    ),
    Rest(
        "stop-run-unknown",
        "POST",
        f"/api/admin/training/{UNKNOWN_RUN}/stop",
        None,
        404,
        "runId",
        (UNKNOWN_RUN, "not found"),
    ),
    Rest(
        "resume-run-id-colons",
        "POST",
        "/api/admin/training/run-20260101-12:00:00/resume",
        None,
        400,
        "runId",
        ("run id",),
    ),
    Rest(
        "artifact-name-traversal",
        "GET",
        f"/api/training/{UNKNOWN_RUN}/artifacts/..%2F..%2Fmanifest.json",
        None,
        400,
        "name",
        ("artifact", "training_results.json"),
    ),
    Rest(
        "artifact-run-id-traversal",
        "GET",
        f"/api/training/..%2F{MARK}/artifacts/x",
        None,
        400,
        "runId",
        ("run id",),
    ),
    # outside reports
    bad_report("report-epoch-zero", "epoch", {**GOOD_REPORT, "epoch": 0}, "epoch"),
    bad_report("report-epoch-huge", "epoch", {**GOOD_REPORT, "epoch": 10**20}, "epoch"),
    bad_report("report-epoch-string", "epoch", {**GOOD_REPORT, "epoch": "1"}, "epoch"),
    bad_report(
        "report-loss-string",
        "val_losses",
        {**GOOD_REPORT, "val_losses": {"m": "low"}},
        "val_losses",
    ),
    bad_report(
        "report-losses-list", "val_losses", {**GOOD_REPORT, "val_losses": [2.5]}, "val_losses"
    ),
    bad_report("report-losses-missing", "val_losses", {"epoch": 1}, "val_losses", "required"),
    bad_report("report-unknown-field", "lossess", {**GOOD_REPORT, "lossess": {}}, "unknown"),
    bad_report(
        "report-auto-stop-key",
        "auto_stop_info",
        {**GOOD_REPORT, "auto_stop_info": {"treshold": 0.1}},
        "treshold",
    ),
    bad_report(
        "report-progress-over-100",
        "progress_percent",
        {**GOOD_REPORT, "progress_percent": 250},
        "progress_percent",
    ),
    bad_report(
        "report-too-many-models",
        "val_losses",
        {**GOOD_REPORT, "val_losses": {f"m{i}": 1.0 for i in range(101)}},
        "100",
    ),
    Rest(
        "report-run-id-colons",
        "POST",
        "/api/training/run-20260101-12:00:00/metrics",
        json.dumps(GOOD_REPORT).encode(),
        400,
        "runId",
        ("run id",),
        REPORTER,
    ),
]

_POST = b"POST " + START.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
RAW_ROWS: list[Raw] = [
    Raw(
        "authorization-not-utf8",
        _POST + b"Authorization: Bearer \xff\xfe\r\n",
        401,
        "unauthorized",
        ("token",),
    ),
    Raw(
        "authorization-latin1-token",
        _POST + b"Authorization: Bearer caf\xe9\r\n",
        401,
        "unauthorized",
        ("token",),
    ),
    Raw(
        "origin-not-utf8",
        _POST + f"Authorization: Bearer {ADMIN}\r\n".encode() + b"Origin: http://\xff.example\r\n",
        403,
        "forbidden",
        ("refused",),
    ),
]

SOCKET_ROWS: list[Socket] = [
    Socket("ws-no-run-id", "", ()),
    Socket("ws-run-id-traversal", f"runId=../../{MARK}", ("run id",)),
    Socket("ws-run-id-colons", "runId=run-20260101-12:00:00", ("run id",)),
    Socket("ws-since-negative", f"runId={UNKNOWN_RUN}&since=-1", ("since",)),
    Socket("ws-since-text", f"runId={UNKNOWN_RUN}&since=abc", ("since",)),
    Socket("ws-since-huge", f"runId={UNKNOWN_RUN}&since={'9' * 40}", ("since",)),
    Socket("ws-unknown-run", f"runId={UNKNOWN_RUN}", (UNKNOWN_RUN,)),
]

T, M = "training", "metrics"
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
_start = training_pb2.StartRunRequest


def rpc_start(name: str, field: str, words: tuple[str, ...], **fields: Any) -> Rpc:
    fields.setdefault("dataset_id", "small")
    fields.setdefault("base_models", ["tiny-llama"])
    fields.setdefault("epochs", 1)
    code = NOT_FOUND if "not found" in words else INVALID
    return Rpc(name, T, "StartRun", _start(**fields), code, field, words)


RPC_ROWS: list[Rpc] = [
    Rpc("grpc-start-empty", T, "StartRun", _start(), INVALID, "datasetId", ("datasetid",)),
    rpc_start("grpc-start-no-models", "baseModels", ("no base models",), base_models=[]),
    rpc_start("grpc-start-dotdot-model", "baseModels", ("not valid",), base_models=[f"../{MARK}"]),
    rpc_start(
        "grpc-start-absolute-model", "baseModels", ("not valid",), base_models=[f"/tmp/{MARK}"]
    ),
    rpc_start(
        "grpc-start-duplicate-models",
        "baseModels",
        ("twice",),
        base_models=["tiny-gpt2", "tiny-gpt2"],
    ),
    rpc_start("grpc-start-unknown-model", "baseModels", ("not found",), base_models=["ghost"]),
    rpc_start("grpc-start-dotdot-dataset", "datasetId", ("not valid",), dataset_id=f"../{MARK}"),
    rpc_start("grpc-start-unknown-dataset", "datasetId", ("not found",), dataset_id="ghost"),
    rpc_start("grpc-start-epochs-zero", "epochs", ("epochs",), epochs=0),
    rpc_start("grpc-start-epochs-huge", "epochs", ("epochs",), epochs=2**62),
    rpc_start("grpc-start-rate-nan", "learningRate", ("learningrate",), learning_rate=float("nan")),
    rpc_start("grpc-start-rate-negative", "learningRate", ("learningrate",), learning_rate=-1.0),
    rpc_start("grpc-start-seed-huge", "seed", ("seed",), seed=2**40),
    rpc_start("grpc-start-unknown-method", "method", ("not a training method",), method=99),
    rpc_start(
        "grpc-start-split-one", "validationSplit", ("validationsplit",), validation_split=1.0
    ),
    Rpc(
        "grpc-get-run-traversal",
        T,
        "GetRun",
        training_pb2.GetRunRequest(run_id=f"../{MARK}"),
        INVALID,
        "runId",
        ("run id",),
    ),
    Rpc(
        "grpc-get-run-colons",
        T,
        "GetRun",
        training_pb2.GetRunRequest(run_id="run-20260101-12:00:00"),
        INVALID,
        "runId",
        ("run id",),
    ),
    Rpc(
        "grpc-get-run-unknown",
        T,
        "GetRun",
        training_pb2.GetRunRequest(run_id=UNKNOWN_RUN),
        NOT_FOUND,
        "runId",
        (UNKNOWN_RUN,),
    ),
    Rpc(
        "grpc-stop-unknown",
        T,
        "StopRun",
        training_pb2.StopRunRequest(run_id=UNKNOWN_RUN),
        NOT_FOUND,
        "runId",
        (UNKNOWN_RUN,),
    ),
    Rpc(
        "grpc-list-runs-negative-limit",
        T,
        "ListRuns",
        training_pb2.ListRunsRequest(limit=-1),
        INVALID,
        "limit",
        ("limit",),
    ),
    Rpc(
        "grpc-artifact-traversal",
        T,
        "GetArtifact",
        training_pb2.GetArtifactRequest(run_id=f"..\\{MARK}", name="../../x"),
        INVALID,
        "runId",
        ("run id",),
    ),
    Rpc(
        "grpc-watch-bad-id",
        T,
        "WatchRun",
        training_pb2.WatchRunRequest(run_id="run-1"),
        INVALID,
        "runId",
        ("run id",),
        stream=True,
    ),
    Rpc(
        "grpc-stream-negative-cursor",
        T,
        "StreamEvents",
        training_pb2.StreamEventsRequest(after_cursor=-1),
        INVALID,
        "after_cursor",
        ("after_cursor",),
        stream=True,
    ),
    Rpc(
        "grpc-metrics-bad-id",
        M,
        "GetMetrics",
        metrics_pb2.GetMetricsRequest(run_id="run:1"),
        INVALID,
        "runId",
        ("run id",),
    ),
    Rpc(
        "grpc-leaderboard-unknown",
        M,
        "GetLeaderboard",
        metrics_pb2.GetLeaderboardRequest(run_id=UNKNOWN_RUN),
        NOT_FOUND,
        "runId",
        (UNKNOWN_RUN,),
    ),
    Rpc(
        "grpc-metrics-list-negative-limit",
        M,
        "ListRuns",
        metrics_pb2.ListRunsRequest(limit=-3),
        INVALID,
        "limit",
        ("limit",),
    ),
    Rpc(
        "grpc-metrics-list-bad-status",
        M,
        "ListRuns",
        metrics_pb2.ListRunsRequest(status=99),  # type: ignore[arg-type]
        INVALID,
        "status",
        ("status",),
    ),
    Rpc(
        "grpc-subscribe-negative-seq",
        M,
        "Subscribe",
        metrics_pb2.SubscribeRequest(run_id=UNKNOWN_RUN, after_seq=-1),
        INVALID,
        "after_seq",
        ("after_seq",),
        stream=True,
    ),
    Rpc(
        "grpc-report-traversal",
        M,
        "ReportMetrics",
        metrics_pb2.ReportMetricsRequest(run_id=f"../{MARK}", epoch=1, val_losses={"m": 1.0}),
        INVALID,
        "runId",
        ("run id",),
    ),
    Rpc(
        "grpc-report-epoch-zero",
        M,
        "ReportMetrics",
        metrics_pb2.ReportMetricsRequest(run_id=UNKNOWN_RUN, epoch=0, val_losses={"m": 1.0}),
        INVALID,
        "epoch",
        ("epoch",),
    ),
    Rpc(
        "grpc-report-nan-loss",
        M,
        "ReportMetrics",
        metrics_pb2.ReportMetricsRequest(
            run_id=UNKNOWN_RUN, epoch=1, val_losses={"m": float("nan")}
        ),
        INVALID,
        "val_losses",
        ("val_losses",),
    ),
]

ROWS: list[Row] = [*REST_ROWS, *RAW_ROWS, *SOCKET_ROWS, *RPC_ROWS]
SEEN: dict[str, str] = {}
"""Row name -> the status it got ("400", "grpc:INVALID_ARGUMENT", "ws:1008"), for the count."""


# ---- the suite ----------------------------------------------------------------------------------


@dataclass
class World:
    suite: Suite
    before: set[str]
    basetemp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[World]:
    root = tmp_path_factory.mktemp("bad-input")
    with running_suite(root, demo_models_dir) as suite:
        (Path(suite.env["DATASETS_DIR"]) / "long.jsonl").write_text(long_records(1024, 4200))
        before = tree(root, skip=suite.models_dir)
        yield World(suite, before, tmp_path_factory.getbasetemp())


def words_in(message: str, words: tuple[str, ...]) -> None:
    lowered = message.lower()
    missing = [word for word in words if word.lower() not in lowered]
    assert not missing, f"message {message!r} does not say {missing}"


async def still_serving(suite: Suite, session: aiohttp.ClientSession) -> None:
    """The gateway answers, and its health check reaches both services."""
    async with session.get(f"{suite.gateway.url}/healthz") as reply:
        body = await reply.json()
        assert reply.status == 200 and body == {"status": "ok", "training": True, "metrics": True}


async def rest(suite: Suite, row: Rest, session: aiohttp.ClientSession) -> str:
    headers = {"Authorization": f"Bearer {row.token}", "Content-Type": "application/json"}
    url = f"{suite.gateway.url}{row.path}"
    # a large bytes body makes aiohttp warn; a stream is the same bytes on the wire
    data = io.BytesIO(row.body) if row.body is not None and len(row.body) > 2**20 else row.body
    async with session.request(
        row.method, URL(url, encoded=True), data=data, headers=headers
    ) as reply:
        text = await reply.text()
        assert reply.status < 500, (reply.status, text)
        assert reply.status == row.status, (reply.status, text)
        if not row.envelope:
            words_in(text, row.words)
            return str(reply.status)
        assert reply.content_type == "application/json", text
        envelope = json.loads(text)
        assert set(envelope) == {"error", "message", "field"}, envelope
        assert (
            envelope["error"]
            == {400: "bad_request", 404: "not_found", 413: "payload_too_large"}[row.status]
        ), envelope
        assert envelope["field"] == row.field, envelope
        words_in(envelope["message"], row.words)
        return str(reply.status)


async def socket(suite: Suite, row: Socket, session: aiohttp.ClientSession) -> str:
    url = f"{suite.gateway.url}/ws/training?{row.query}"
    async with session.ws_connect(url, headers={"Authorization": f"Bearer {ADMIN}"}) as ws:
        messages = []
        while True:
            message = await ws.receive(timeout=30)
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            messages.append(json.loads(message.data))
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message
        assert ws.close_code == 1008, (ws.close_code, messages)
    if row.words:
        assert len(messages) == 1 and messages[0]["type"] == "error", messages
        assert messages[0]["error"] in ("bad_request", "not_found"), messages
        words_in(messages[0]["message"], row.words)
    else:
        assert messages == []
    return f"ws:{ws.close_code}"


def raw(suite: Suite, row: Raw) -> str:
    address = urlsplit(suite.gateway.url)
    body = start()
    request = row.head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    with socket_module.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status < 500 and status == row.status, answer[:500]
    envelope = json.loads(payload)
    assert envelope["error"] == row.error, envelope
    words_in(envelope["message"], row.words)
    return str(status)


def rpc(suite: Suite, row: Rpc) -> str:
    addr = suite.training.addr if row.service == T else suite.metrics.addr
    with grpc.insecure_channel(addr) as channel:
        stub: Any = (
            training_pb2_grpc.TrainingServiceStub(channel)
            if row.service == T
            else metrics_pb2_grpc.MetricsServiceStub(channel)
        )
        method = getattr(stub, row.method)
        with pytest.raises(grpc.RpcError) as caught:
            if row.stream:
                list(method(row.request, timeout=20, metadata=row.metadata))
            else:
                method(row.request, timeout=20, metadata=row.metadata)
    error: Any = caught.value
    assert error.code() == row.code, (error.code(), error.details())
    words_in(error.details(), row.words)
    trailing = dict(error.trailing_metadata() or ())
    assert trailing.get(FIELD_METADATA_KEY) == row.field, (trailing, error.details())
    return f"grpc:{error.code().name}"


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
async def test_bad_request_is_refused_clearly(world: World, row: Row) -> None:
    suite = world.suite
    async with aiohttp.ClientSession() as session:
        try:
            if isinstance(row, Rest):
                outcome = await rest(suite, row, session)
            elif isinstance(row, Socket):
                outcome = await socket(suite, row, session)
            elif isinstance(row, Raw):
                outcome = await asyncio.to_thread(raw, suite, row)
            else:
                outcome = await asyncio.to_thread(rpc, suite, row)
        finally:
            await still_serving(suite, session)
    SEEN[row.name] = outcome


def test_the_table_is_large_and_nothing_escaped(world: World) -> None:
    """Runs after the table: counts it, then checks the files and the logs."""
    assert len(ROWS) >= 40 and len({row.name for row in ROWS}) == len(ROWS)
    five_hundreds = [name for name, outcome in SEEN.items() if outcome.startswith("5")]
    assert not five_hundreds
    print(f"bad input: {len(SEEN)} requests answered; 5xx: {len(five_hundreds)} / {len(SEEN)}")
    suite = world.suite
    root = suite.root
    after = tree(root, skip=suite.models_dir)
    assert after == world.before, sorted(after ^ world.before)
    certified = suite.models_dir / "oneseek-certified"
    assert not certified.exists() or not any(certified.iterdir()), "a bad request made a run"
    for where in (world.basetemp, Path("/tmp")):
        escaped = list(where.glob(f"**/*{MARK}*" if where != Path("/tmp") else f"*{MARK}*"))
        assert not escaped, escaped
    logs = suite.outputs()
    assert "Traceback" not in logs, logs[-4000:]
    for secret in (ADMIN, REPORTER):
        assert secret not in logs
