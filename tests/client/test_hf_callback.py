"""OneSeekCallback with a real `transformers.Trainer` training a demo model, reporting to the
real suite: its epochs seen through REST and, live, through the websocket; a Trainer stopped
early ends its run auto_stopped; a suite that is down (or comes back) never breaks training;
a generated run id that another run took moves on to the next one."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from transformers import TrainerCallback

from services.client import Backoff, InvalidInput
from services.client.hf import OneSeekCallback, epoch_index, logged, model_name_of
from services.core.training_config import validate_run_id
from tests.client.conftest import REPORTER, Suite
from tests.client.relay import Relay
from tests.client.trainer import make_trainer
from tests.processes import REPO, free_port

MODEL = "tiny-gpt2"


class EvalLosses(TrainerCallback):  # type: ignore[misc]
    """What the Trainer itself computed, epoch by epoch, to compare the suite's record with."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.losses[round(state.epoch)] = kwargs["metrics"]["eval_loss"]


def callback_for(suite: Suite, **options: Any) -> OneSeekCallback:
    settings: dict[str, Any] = {
        "metrics_addr": suite.metrics.addr,
        "report_token": REPORTER,
        "admin_token": "",
        "backoff": Backoff(0.05, 0.2),
    }
    return OneSeekCallback(**{**settings, **options})


def wait_rest(suite: Suite, path: str, ready: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = suite.rest(path)
            if ready(answer):
                return answer
        except OSError:  # 404 until the first report arrives
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never became ready")
        time.sleep(0.05)


async def next_message(ws: aiohttp.ClientWebSocketResponse, timeout: float = 60) -> dict[str, Any]:
    """The next message that is not a heartbeat, within `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        message = await ws.receive(timeout=max(left, 0.01))
        assert message.type == aiohttp.WSMsgType.TEXT, message
        data: dict[str, Any] = json.loads(message.data)
        if data["type"] != "heartbeat":
            return data


# ---- against the real suite ---------------------------------------------------------------------


@pytest.mark.slow
async def test_a_trainer_run_shows_through_rest_and_the_websocket(
    suite: Suite, demo_models_dir: Path, tmp_path: Path
) -> None:
    """Epoch 1 is reported while the Trainer is held before epoch 2; a websocket that connects
    then gets epoch 1 in its initial_state and epoch 2 live; REST agrees with the Trainer."""
    reporter, losses, gate = callback_for(suite), EvalLosses(), threading.Event()

    class HoldBeforeEpochTwo(TrainerCallback):  # type: ignore[misc]
        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.epoch and round(state.epoch) == 1:
                assert gate.wait(60), "the test never let epoch 2 start"

    # the reporter queues epoch 1 when epoch 2 begins, before the hold (callbacks run in order)
    trainer = make_trainer(
        demo_models_dir / MODEL, tmp_path, callbacks=[losses, reporter, HoldBeforeEpochTwo()]
    )
    training = asyncio.create_task(asyncio.to_thread(trainer.train))
    run_id = reporter.run_id
    try:
        path = f"/api/training/{run_id}/metrics"
        first = await asyncio.to_thread(wait_rest, suite, path, lambda m: m["current_epoch"] == 1)
        assert first["status"] == "running" and first["total_epochs"] == 2
        url = suite.gateway.url.replace("http", "ws") + f"/ws/training?runId={run_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            initial = await next_message(ws)
            assert initial["type"] == "initial_state" and initial["current_epoch"] == 1
            assert initial["val_losses"] == {MODEL: losses.losses[1]}
            gate.set()
            live = [await next_message(ws), await next_message(ws)]
        assert [m["type"] for m in live] == ["epoch_end", "training_complete"]
        assert live[0]["epoch"] == 2 and live[0]["val_losses"] == {MODEL: losses.losses[2]}
        assert live[1]["status"] == "completed" and live[1]["best_model"] == MODEL
    finally:
        gate.set()
        await training
    assert reporter.reported.keys() == {1, 2} and reporter.dropped == 0

    metrics = suite.rest(f"/api/training/{run_id}/metrics")
    assert metrics["status"] == "completed" and metrics["current_epoch"] == 2
    history = metrics["training_history"]
    assert [h["val_losses"] for h in history] == [{MODEL: losses.losses[e]} for e in (1, 2)]
    trained = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [h["train_losses"] for h in history] == [{MODEL: log["loss"]} for log in trained]
    assert [h["lr_multipliers"] for h in history] == [
        {MODEL: log["learning_rate"]} for log in trained
    ]
    board = suite.rest(f"/api/training/{run_id}/leaderboard")["leaderboard"]
    assert board == [
        {
            "model_name": MODEL,
            "rank": 1,
            "val_loss": losses.losses[2],
            "weight_multiplier": 1.0,
            "lr_multiplier": trained[-1]["learning_rate"],
        }
    ]
    assert run_id in [run["run_id"] for run in suite.rest("/api/training/runs")["runs"]]
    # a client that reconnects with since=0 gets every event of the run, in order
    url = suite.gateway.url.replace("http", "ws") + f"/ws/training?runId={run_id}&since=0"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        replay = [await next_message(ws) for _ in range(3)]
    assert [(m["type"], m["seq"]) for m in replay] == [
        ("epoch_end", 1),
        ("epoch_end", 2),
        ("training_complete", 3),
    ]
    assert [m["val_losses"] for m in replay[:2]] == [{MODEL: losses.losses[e]} for e in (1, 2)]


@pytest.mark.slow
def test_a_trainer_stopped_early_ends_its_run_auto_stopped(
    suite: Suite, demo_models_dir: Path, tmp_path: Path
) -> None:
    class StopAfterFirstEpoch(TrainerCallback):  # type: ignore[misc]
        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            control.should_training_stop = True
            return control

    reporter = callback_for(suite, model_name="my-model")
    trainer = make_trainer(
        demo_models_dir / MODEL, tmp_path, callbacks=[StopAfterFirstEpoch(), reporter], epochs=3
    )
    trainer.train()
    assert reporter.reported.keys() == {1}
    metrics = suite.rest(f"/api/training/{reporter.run_id}/metrics")
    assert metrics["status"] == "auto_stopped" and metrics["total_epochs"] == 3
    assert list(metrics["training_history"][0]["val_losses"]) == ["my-model"]


@pytest.mark.slow
def test_the_suite_down_costs_training_nothing(
    demo_models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    reporter = OneSeekCallback(
        metrics_addr=nowhere, report_token="", admin_token="", flush_timeout=1.0
    )
    losses = EvalLosses()
    trainer = make_trainer(demo_models_dir / MODEL, tmp_path, callbacks=[losses, reporter])
    with caplog.at_level(logging.WARNING, logger="oneseek.client.hf"):
        result = trainer.train()
    assert result.global_step > 0 and losses.losses.keys() == {1, 2}
    assert reporter.reported == {} and reporter.dropped == 2
    assert nowhere in caplog.text and "not reported yet" in caplog.text


@pytest.mark.slow
def test_reports_wait_for_a_suite_that_comes_back(
    suite: Suite, demo_models_dir: Path, tmp_path: Path
) -> None:
    with Relay(suite.metrics.addr) as relay:
        relay.block()

        class BackAtTheEnd(TrainerCallback):  # type: ignore[misc]
            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                relay.unblock()  # before the reporter's flush: it delivers what waited

        reporter = callback_for(suite, metrics_addr=relay.addr, flush_timeout=60.0)
        trainer = make_trainer(
            demo_models_dir / MODEL, tmp_path, callbacks=[BackAtTheEnd(), reporter]
        )
        trainer.train()
    assert reporter.reported.keys() == {1, 2} and reporter.dropped == 0
    history = suite.rest(f"/api/training/{reporter.run_id}/metrics")["training_history"]
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.slow
def test_a_taken_generated_run_id_moves_on(
    suite: Suite, demo_models_dir: Path, tmp_path: Path
) -> None:
    reporter = callback_for(suite)
    taken = reporter.run_id
    with suite.client(report_token=REPORTER) as client:  # another outside run got there first
        client.report_epoch(taken, 1, {"someone-else": 1.0}, total_epochs=1)
    make_trainer(demo_models_dir / MODEL, tmp_path, callbacks=[reporter]).train()
    moved = reporter.run_id
    assert moved != taken and moved[:19] == taken[:19]  # run-YYYYMMDD-HHMMSS-N
    assert reporter.reported.keys() == {1, 2}
    assert suite.rest(f"/api/training/{moved}/metrics")["status"] == "completed"
    assert suite.rest(f"/api/training/{taken}/metrics")["current_epoch"] == 1


# ---- without a suite ----------------------------------------------------------------------------


def test_epochs_of_a_trainer() -> None:
    assert [epoch_index(e) for e in (0.0, 0.25, 1.0, 1.0000001, 1.5, 2.0, 2.999)] == [
        0,
        1,
        1,
        1,
        2,
        2,
        3,
    ]
    history = [
        {"loss": 3.0, "epoch": 0.5, "step": 1},
        {"loss": 2.5, "epoch": 1.0, "step": 2},
        {"eval_loss": 2.6, "epoch": 1.0, "step": 2},
        {"loss": 2.2, "epoch": 1.5, "step": 3},
        {"eval_loss": 2.3, "epoch": 2.0, "step": 4},
    ]
    assert logged(history, 1, "loss") == 2.5
    assert logged(history, 2, "loss") == 2.2
    assert logged(history, 2, "eval_loss") == 2.3
    assert logged(history, 3, "loss") is None
    assert logged([], 1, "loss") is None
    assert logged([{"loss": float("nan"), "epoch": 1.0}], 1, "loss") is None


def test_model_names_from_a_models_config() -> None:
    class Config:
        def __init__(self, path: str) -> None:
            self._name_or_path = path

    class Model:
        def __init__(self, path: str) -> None:
            self.config = Config(path)

    assert model_name_of(Model("/data/models/tiny-gpt2/")) == "tiny-gpt2"
    assert model_name_of(Model("meta-llama/Llama-3.1-8B")) == "Llama-3.1-8B"
    assert model_name_of(Model("my model (v2)")) == "my-model-v2"
    assert model_name_of(Model("")) == "model"
    assert model_name_of(object()) == "model"


def test_bad_names_are_refused_when_the_callback_is_made() -> None:
    with pytest.raises(InvalidInput) as bad_run:
        OneSeekCallback("my-run", metrics_addr="127.0.0.1:1")
    assert bad_run.value.field == "runId"
    with pytest.raises(InvalidInput):
        OneSeekCallback(model_name="../x", metrics_addr="127.0.0.1:1")
    assert validate_run_id(OneSeekCallback(metrics_addr="127.0.0.1:1").run_id)
    # two callbacks made in the same second never share a generated run id
    ids = {OneSeekCallback(metrics_addr="127.0.0.1:1").run_id for _ in range(5)}
    assert len(ids) == 5


def test_only_the_main_process_reports() -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    reporter = OneSeekCallback(metrics_addr="127.0.0.1:1", flush_timeout=0.1)
    state = TrainerState(epoch=1.0, num_train_epochs=1, is_world_process_zero=False)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    control = TrainerControl()
    reporter.on_evaluate(args, state, control, metrics={"eval_loss": 1.0})
    reporter.on_train_end(args, state, control)
    assert reporter._pending == {} and reporter._sender._thread is None


def test_the_client_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, services.client\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_the_sender_keeps_order_retries_and_drops_the_oldest() -> None:
    from services.api import metrics_pb2
    from services.client.hf import ReportSender
    from services.core.errors import Unavailable

    gate, sent, tries = threading.Event(), [], {"n": 0}

    def send(request: metrics_pb2.ReportMetricsRequest) -> int:
        gate.wait(10)
        if request.epoch == 1 and tries["n"] < 2:  # the suite is away for two tries
            tries["n"] += 1
            raise Unavailable("down")
        if request.epoch == 4:
            raise InvalidInput("refused", field="epoch")
        sent.append(request.epoch)
        return request.epoch * 10

    delivered: dict[int, int] = {}
    sender = ReportSender(
        send,
        lambda request, seq: delivered.__setitem__(request.epoch, seq),
        capacity=4,  # the one being sent included
        backoff=Backoff(0.01, 0.02),
    )
    for epoch in range(1, 6):  # epoch 1 is being sent (held at the gate) while 2..5 queue
        sender.submit(metrics_pb2.ReportMetricsRequest(run_id="run-20250101-000000", epoch=epoch))
        time.sleep(0.05)
    gate.set()
    assert sender.flush(10)
    assert sent == [1, 3, 5]  # 2 dropped (queue full), 4 refused
    assert delivered == {1: 10, 3: 30, 5: 50} and tries["n"] == 2
    assert sender.dropped == 2 and sender.close() == 0
