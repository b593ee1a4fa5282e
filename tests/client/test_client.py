"""The typed client, blocking and asyncio, against the real suite: a real short run started,
watched to its end and again from the middle (exactly the later events), its metrics and
leaderboard; a watch whose connection is cut mid-run resumes with nothing lost or repeated; an
outside run reported epoch by epoch; refusals raised as the project's own errors."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from services.api import training_pb2
from services.api.codec import event_to_dict, message_to_dict
from services.client import (
    AlreadyExists,
    AsyncOneSeekClient,
    Backoff,
    Conflict,
    InvalidInput,
    NotAuthorized,
    NotFound,
    OneSeekClient,
    Unavailable,
)
from tests.client.conftest import ADMIN, REPORTER, Suite, start_when_idle
from tests.client.relay import Relay
from tests.processes import free_port

pytestmark = pytest.mark.slow
TERMINAL = ("training_complete", "training_error")


def kinds(events: list[training_pb2.TrainingEvent]) -> list[str]:
    return [str(event.WhichOneof("payload")) for event in events]


def test_a_run_started_watched_and_read_back(suite: Suite) -> None:
    with suite.client() as client:
        run_id = start_when_idle(client, epochs=1)
        events = list(client.watch(run_id))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert kinds(events)[0] == "epoch_start" and kinds(events)[-1] == "training_complete"
        assert events[-1].training_complete.status == training_pb2.RUN_STATUS_COMPLETED
        # the generated messages: the shared codec makes them the JSON the websocket sends
        assert event_to_dict(events[0])["type"] == "epoch_start"

        # a watch resumed from the middle gets exactly the later events
        middle = len(events) // 2
        assert list(client.watch(run_id, after_seq=middle)) == events[middle:]
        assert list(client.watch(run_id, after_seq=len(events))) == []

        run = client.get_run(run_id)
        assert run.status == training_pb2.RUN_STATUS_COMPLETED and run.last_seq == len(events)
        assert run.run_id in [r.run_id for r in client.list_runs(status="completed")]
        end = next(e.epoch_end for e in events if e.WhichOneof("payload") == "epoch_end")

        metrics = client.metrics(run_id)  # the metrics service follows a moment behind
        for _ in range(300):
            if metrics.status == training_pb2.RUN_STATUS_COMPLETED:
                break
            time.sleep(0.1)
            metrics = client.metrics(run_id)
        assert metrics.status == training_pb2.RUN_STATUS_COMPLETED
        assert [message_to_dict(h) for h in metrics.training_history] == [message_to_dict(end)]
        board = client.leaderboard(run_id)
        assert [(e.model_name, e.rank) for e in board.leaderboard] == [("tiny-llama", 1)]
        assert board.leaderboard[0].val_loss == end.val_losses["tiny-llama"]
        summaries = client.run_summaries(limit=5)
        assert run_id in [s.run_id for s in summaries]
        assert "small" in [d.id for d in client.list_datasets()]
        assert "tiny-llama" in [m.name for m in client.list_models()]
        artifact = client.get_artifact(run_id, "training_results.json")
        assert artifact.run_id == run_id and '"history"' in artifact.content


async def test_the_async_client_does_the_same(suite: Suite) -> None:
    with suite.client() as blocking:
        run_id = start_when_idle(blocking, epochs=1)
    async with AsyncOneSeekClient(
        suite.training.addr, suite.metrics.addr, admin_token=ADMIN, report_token=""
    ) as client:
        events = [event async for event in client.watch(run_id)]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert kinds(events)[-1] == "training_complete"
        middle = len(events) // 2
        assert [e async for e in client.watch(run_id, after_seq=middle)] == events[middle:]
        run = await client.get_run(run_id)
        assert run.status == training_pb2.RUN_STATUS_COMPLETED
        assert run_id in [r.run_id for r in await client.list_runs()]
        assert (await client.metrics(run_id)).run_id == run_id
        board = await client.leaderboard(run_id)
        assert [e.model_name for e in board.leaderboard] == ["tiny-llama"]
        assert run_id in [s.run_id for s in await client.run_summaries()]
        with pytest.raises(NotFound):
            await client.get_run("run-20000101-000000")
        with pytest.raises(InvalidInput) as refused:
            await client.start_run("small", ["tiny-llama"], epochs=0)
        assert refused.value.field == "epochs"


def test_a_cut_watch_resumes_after_its_last_event(suite: Suite) -> None:
    """The connection is cut twice while the run trains: the client opens the stream again
    after the last seq it yielded, and the events it yields are the run's, each once."""
    with Relay(suite.training.addr) as relay, suite.client() as admin:
        run_id = start_when_idle(admin, epochs=2)
        watcher = OneSeekClient(relay.addr, suite.metrics.addr, admin_token=ADMIN, tls_ca=None)
        with watcher:
            seen: list[training_pb2.TrainingEvent] = []
            for event in watcher.watch(run_id):
                seen.append(event)
                if len(seen) in (1, 3):
                    relay.cut()
        truth = list(admin.watch(run_id))
    assert relay.accepted >= 3  # the first connection and one after each cut
    assert seen == truth
    assert kinds(seen)[-1] == "training_complete"


async def test_an_async_watch_cut_resumes_too(suite: Suite) -> None:
    with suite.client() as admin:
        run_id = start_when_idle(admin, epochs=2)
    with Relay(suite.training.addr) as relay:
        async with AsyncOneSeekClient(relay.addr, suite.metrics.addr, admin_token=ADMIN) as watcher:
            seen = []
            async for event in watcher.watch(run_id):
                seen.append(event)
                if len(seen) == 2:
                    relay.cut()
    with suite.client() as admin:
        truth = list(admin.watch(run_id))
    assert relay.accepted >= 2
    assert seen == truth


def test_a_watch_gives_up_after_its_retries(suite: Suite) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    client = OneSeekClient(nowhere, nowhere, retries=2, backoff=Backoff(0.01, 0.02))
    with client, pytest.raises(Unavailable) as gone:
        list(client.watch("run-20000101-000000"))
    assert nowhere in str(gone.value)


def test_an_outside_run_reported_epoch_by_epoch(suite: Suite) -> None:
    run_id = "run-20250102-030405"
    with suite.client(admin_token="", report_token=REPORTER) as client:
        first = client.report_epoch(
            run_id, 1, {"my-model": 2.5}, total_epochs=2, train_losses={"my-model": 2.7}
        )
        # the same report again (a retry after a lost answer) stores nothing
        assert (
            client.report_epoch(
                run_id, 1, {"my-model": 2.5}, total_epochs=2, train_losses={"my-model": 2.7}
            )
            == first
        )
        with pytest.raises(AlreadyExists) as twice:
            client.report_epoch(run_id, 1, {"my-model": 2.4}, total_epochs=2)
        assert "already reported" in str(twice.value)
        second = client.report_epoch(run_id, 2, {"my-model": 2.0})
        assert second > first
        metrics = client.metrics(run_id)
        assert metrics.status == training_pb2.RUN_STATUS_COMPLETED
        assert [dict(h.val_losses) for h in metrics.training_history] == [
            {"my-model": 2.5},
            {"my-model": 2.0},
        ]
        board = client.leaderboard(run_id)
        assert [(e.model_name, e.val_loss) for e in board.leaderboard] == [("my-model", 2.0)]
        with pytest.raises(Conflict):  # a completed run takes no more reports
            client.report_epoch(run_id, 3, {"my-model": 1.9}, total_epochs=3)
    # and the gateway serves it like any run
    assert suite.rest(f"/api/training/{run_id}/metrics")["status"] == "completed"


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.report_epoch("run-20250102-030406", 0, {"m": 1.0}), "epoch"),
        (lambda c: c.report_epoch("run-20250102-030406", 1, {}), "val_losses"),
        (lambda c: c.report_epoch("run-20250102-030406", 1, {"m": math.nan}), "val_losses"),
        (lambda c: c.report_epoch("run-20250102-030406", 1, {"a/b": 1.0}), "val_losses"),
        (lambda c: c.report_epoch("run-20250102-030406", 1.5, {"m": 1.0}), "epoch"),
        (lambda c: c.report_epoch("run-20250102-030406", 1, {"m": "low"}), "val_losses"),
        (lambda c: c.report_epoch("run-1", 1, {"m": 1.0}), "runId"),
        (lambda c: c.report_epoch("run-20250102-030406", 3, {"m": 1.0}, total_epochs=2), None),
        (lambda c: c.start_run("small", ["tiny-llama"], epochs=0), "epochs"),
        (lambda c: c.start_run("small", ["tiny-llama"], epoch=2), "epoch"),
        (lambda c: c.start_run("small", [], epochs=1), "baseModels"),
        (lambda c: c.start_run("../etc", ["tiny-llama"]), "datasetId"),
        (lambda c: c.start_run("small", "tiny-llama", method="sgd"), "method"),
        (lambda c: c.start_run("small", "tiny-llama", quantization="4bit", method="full"), None),
        (lambda c: c.watch("run-20250102-030406", after_seq=-1), "after_seq"),
        (lambda c: c.list_runs(status="done"), "status"),
        (lambda c: c.generate("run-20250102-030406", "hi", temperature=5), "temperature"),
    ],
)
def test_bad_input_is_refused_before_anything_is_sent(
    call: Any, field: str | None, suite: Suite
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens: a sent request would be Unavailable
    with OneSeekClient(nowhere, nowhere) as client, pytest.raises(InvalidInput) as refused:
        call(client)
    if field is not None:
        assert refused.value.field == field
    assert str(refused.value)


def test_the_services_refusals_are_the_projects_errors(suite: Suite, tmp_path: Path) -> None:
    with suite.client() as client:
        with pytest.raises(NotFound) as unknown_run:
            client.metrics("run-20000101-000000")
        assert unknown_run.value.field == "runId"
        with pytest.raises(NotFound):
            client.get_run("run-20000101-000000")
        with pytest.raises(NotFound) as unknown_dataset:
            client.start_run("no-such-dataset", ["tiny-llama"], epochs=1)
        assert unknown_dataset.value.field == "datasetId"
        with pytest.raises(NotFound):
            client.start_run("small", ["no-such-model"], epochs=1)
        # the suite's own run takes no outside report
        own = client.list_runs(limit=1)
        if own:
            with pytest.raises(Conflict):
                client.report_epoch(own[0].run_id, 99, {"m": 1.0})
    with suite.client(admin_token="") as anonymous:
        with pytest.raises(NotAuthorized):
            anonymous.start_run("small", ["tiny-llama"], epochs=1)
        with pytest.raises(NotAuthorized):
            anonymous.report_epoch("run-20250102-030407", 1, {"m": 1.0})
    with (
        suite.client(admin_token="wrong", report_token="wrong") as wrong,
        pytest.raises(NotAuthorized),
    ):
        wrong.report_epoch("run-20250102-030407", 1, {"m": 1.0})
    nowhere = f"127.0.0.1:{free_port()}"
    with OneSeekClient(nowhere, nowhere, timeout=2) as down, pytest.raises(Unavailable) as gone:
        down.metrics("run-20000101-000000")
    assert nowhere in str(gone.value)


def test_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ONESEEK_TRAINING_ADDR", "127.0.0.1:1")
    monkeypatch.setenv("ONESEEK_METRICS_ADDR", "127.0.0.1:2")
    monkeypatch.setenv("ONESEEK_ADMIN_TOKEN", "a")
    monkeypatch.setenv("ONESEEK_REPORT_TOKEN", "r")
    monkeypatch.delenv("ONESEEK_TLS_CA", raising=False)
    settings = OneSeekClient().settings
    assert (settings.training_addr, settings.metrics_addr) == ("127.0.0.1:1", "127.0.0.1:2")
    assert settings.training_metadata() == (("authorization", "Bearer a"),)
    assert settings.report_metadata() == (("authorization", "Bearer r"),)
    assert settings.root_certificates is None
    assert OneSeekClient(admin_token="", report_token="").settings.report_metadata() == ()
    # without the variable, the token `oneseek up` stored
    monkeypatch.delenv("ONESEEK_ADMIN_TOKEN")
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(tmp_path / "var"))
    assert OneSeekClient().settings.admin_token is None
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "admin_token").write_text("stored\n")
    assert OneSeekClient().settings.training_metadata() == (("authorization", "Bearer stored"),)
    monkeypatch.setenv("ONESEEK_TLS_CA", str(tmp_path / "missing.pem"))
    with pytest.raises(InvalidInput) as unreadable:
        OneSeekClient()
    assert unreadable.value.field == "--tls-ca"
