"""`OneSeekCallback`: a Hugging Face `Trainer` reports its evaluation loss, epoch by epoch, to
the suite as an outside run, so an existing training script shows on the live leaderboard, the
websocket feed and the admin page beside the suite's own runs.

What is reported, once per epoch: the model's validation loss (the evaluation's `eval_loss`,
the latest evaluation of the epoch when there are several), its training loss and learning
rate (the latest the Trainer logged in that epoch, when it logged them; the rate shows as the
model's `lr_multiplier`), the epoch (1, 2, ...) and the planned epochs
(`state.num_train_epochs`). An epoch's report goes when the next epoch begins, right after its
evaluation and checkpoint, or at once for the planned last epoch: by then the Trainer knows
whether it goes on. The report of the planned last epoch completes the run; a Trainer that
stops before it (early stopping) ends its run as `auto_stopped` with its last report.

It must never break or noticeably slow the training it watches: a callback only queues the
report (a bounded queue: when it is full the oldest report waiting is dropped), a daemon thread
sends them in order, retrying with backoff while the suite is unreachable, and logs (never
raises) what fails. At the end of training it waits at most `flush_timeout` seconds for the
queue to empty. Only the main process of a distributed run reports.

Reports are idempotent (the suite answers a repeated report with the seq it stored it under),
so retrying after a lost answer never stores an epoch twice.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from services.api import metrics_pb2, training_pb2
from services.client.settings import Backoff
from services.client.sync import OneSeekClient
from services.core.errors import Conflict, InvalidInput, OneSeekError, Unavailable
from services.core.training_config import (
    generate_run_id,
    validate_model_name,
    validate_run_id,
)

log = logging.getLogger("oneseek.client.hf")

_EPSILON = 1e-6
"""How far a float epoch may be from a whole number and still be that epoch's end."""
_RENAMES = 20
"""How many other generated run ids are tried when the first one turns out to be taken."""


def model_name_of(model: Any) -> str:
    """The basename of `model.config._name_or_path` as a valid model name ("model" if none)."""
    config = getattr(model, "config", None)
    path = str(getattr(config, "_name_or_path", "") or "")
    name = Path(path.rstrip("/")).name if path else ""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).replace("..", ".").strip("-._")[:128]
    try:
        return validate_model_name(name)
    except InvalidInput:
        return "model"


def epoch_index(epoch: float) -> int:
    """The epoch (1, 2, ...) that a Trainer's float epoch falls in: 1.0 is the end of epoch 1,
    1.5 the middle of epoch 2."""
    nearest = round(epoch)
    return int(nearest) if abs(epoch - nearest) < _EPSILON else math.ceil(epoch)


def logged(history: Sequence[Mapping[str, Any]], epoch: int, key: str) -> float | None:
    """The latest finite value of `key` ("loss", "learning_rate") that the Trainer logged
    within `epoch`, if any."""
    for entry in reversed(history):
        when, value = entry.get("epoch"), entry.get(key)
        if not isinstance(when, (int, float)):
            continue
        if when <= epoch - 1 + _EPSILON:
            return None
        if when <= epoch + _EPSILON and isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


_GENERATED: set[str] = set()
_GENERATING = threading.Lock()


def new_run_id(created: datetime, taken: set[str]) -> str:
    """`run-YYYYMMDD-HHMMSS` of `created`, with the next free suffix: never one in `taken`, nor
    one this process handed out already (two callbacks made in the same second)."""
    with _GENERATING:
        run_id = generate_run_id(created, exists=lambda c: c in taken or c in _GENERATED)
        _GENERATED.add(run_id)
        return run_id


class _RetryNow(Exception):
    """The report should be sent again at once (it now carries another run id)."""


class ReportSender:
    """Sends reports in order from one daemon thread. `send` returns the seq of a delivered
    report; raising Unavailable means "try again later" (with backoff), _RetryNow "at once",
    anything else drops the report (logged)."""

    def __init__(
        self,
        send: Callable[[metrics_pb2.ReportMetricsRequest], int],
        delivered: Callable[[metrics_pb2.ReportMetricsRequest, int], None],
        *,
        capacity: int,
        backoff: Backoff,
    ) -> None:
        self._send, self._delivered = send, delivered
        self._capacity, self._backoff = capacity, backoff
        self._queue: collections.deque[metrics_pb2.ReportMetricsRequest] = collections.deque()
        self._changed = threading.Condition()
        self._busy = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self.dropped = 0
        """Reports given up: the queue was full, the suite refused them, or it stayed away."""

    def submit(self, request: metrics_pb2.ReportMetricsRequest) -> None:
        with self._changed:
            if len(self._queue) >= self._capacity:
                # the oldest waiting one; the head stays while it is being sent
                oldest = 1 if self._busy and len(self._queue) > 1 else 0
                lost = self._queue[oldest]
                del self._queue[oldest]
                self.dropped += 1
                log.warning(
                    "report queue full (%d): epoch %d of %s dropped unsent",
                    self._capacity,
                    lost.epoch,
                    lost.run_id,
                )
            self._queue.append(request)
            self._closing = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="oneseek-report", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def flush(self, timeout: float) -> bool:
        """Waits until every queued report was sent (or given up), at most `timeout` seconds;
        whether it emptied."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def close(self) -> int:
        """Stops the thread after the report it is sending (given up if that one fails too);
        returns how many waiting reports were given up."""
        with self._changed:
            keep = 1 if self._busy and self._queue else 0
            left = len(self._queue) - keep
            for _ in range(left):
                self._queue.pop()
            self.dropped += left
            self._closing = True
            self._changed.notify_all()
        return left

    def _run(self) -> None:
        attempt = 0
        while True:
            with self._changed:
                while not self._queue and not self._closing:
                    self._changed.wait()
                if not self._queue:
                    return
                request = self._queue[0]
                self._busy = True
            retry_in = 0.0
            try:
                seq = self._send(request)
            except _RetryNow:
                retry_in = -1.0
            except Unavailable as error:
                attempt += 1
                retry_in = self._backoff.delay(attempt)
                log_at = logging.WARNING if attempt == 1 else logging.DEBUG
                log.log(
                    log_at,
                    "epoch %d of %s not reported yet, retrying in the background: %s",
                    request.epoch,
                    request.run_id,
                    error,
                )
            except OneSeekError as error:
                log.warning(
                    "epoch %d of %s was refused by the suite and is dropped: %s",
                    request.epoch,
                    request.run_id,
                    error,
                )
                self.dropped += 1
            except Exception:  # a bug must not kill the thread that later reports need
                log.exception("epoch %d of %s could not be reported", request.epoch, request.run_id)
                self.dropped += 1
            else:
                if attempt:
                    log.info(
                        "the suite answers again: epoch %d of %s reported (seq %d)",
                        request.epoch,
                        request.run_id,
                        seq,
                    )
                attempt = 0
                self._delivered(request, seq)
            with self._changed:
                if retry_in != 0.0 and self._closing:  # training has ended: no more tries
                    log.warning(
                        "epoch %d of %s dropped: the suite did not answer before training ended",
                        request.epoch,
                        request.run_id,
                    )
                    self.dropped += 1
                    retry_in = 0.0
                if retry_in == 0.0 and self._queue and self._queue[0] is request:
                    self._queue.popleft()
                self._busy = False
                self._changed.notify_all()
                if retry_in > 0:
                    self._changed.wait_for(lambda: self._closing, retry_in)


class OneSeekCallback(TrainerCallback):  # type: ignore[misc]
    """Reports a Trainer's evaluation loss per epoch to the suite as an outside run.

    Pass it in `Trainer(callbacks=[OneSeekCallback()])` and evaluate every epoch
    (`eval_strategy="epoch"`). `run_id`: the run to report (default: a new
    `run-YYYYMMDD-HHMMSS`, kept in `self.run_id`); `model_name`: the name the leaderboard
    shows (default: the basename of `model.config._name_or_path`). The suite is found as the
    client finds it (ONESEEK_METRICS_ADDR, ONESEEK_REPORT_TOKEN or ONESEEK_ADMIN_TOKEN,
    ONESEEK_TLS_CA) unless `client` or the arguments say otherwise.
    """

    def __init__(
        self,
        run_id: str | None = None,
        model_name: str | None = None,
        *,
        client: OneSeekClient | None = None,
        metrics_addr: str | None = None,
        report_token: str | None = None,
        admin_token: str | None = None,
        tls_ca: str | None = None,
        metric: str = "eval_loss",
        queue_size: int = 64,
        flush_timeout: float = 10.0,
        call_timeout: float = 5.0,
        backoff: Backoff | None = None,
    ) -> None:
        self._created = datetime.now(timezone.utc)
        self._tried: set[str] = set()
        self.run_id = (
            validate_run_id(run_id) if run_id is not None else new_run_id(self._created, set())
        )
        self.model_name = None if model_name is None else validate_model_name(model_name)
        self.metric = metric
        self.flush_timeout = flush_timeout
        self.reported: dict[int, int] = {}
        """epoch -> the seq the suite stored its report under (filled by the sending thread)."""
        self._given_model = model_name is not None
        self._generated = run_id is None
        self._owns_client = client is None
        self._client = client or OneSeekClient(
            metrics_addr=metrics_addr,
            report_token=report_token,
            admin_token=admin_token,
            tls_ca=tls_ca,
            timeout=call_timeout,
        )
        self._sender = ReportSender(
            self._send,
            self._delivered,
            capacity=queue_size,
            backoff=backoff or Backoff(initial=0.5, maximum=10.0),
        )
        self._pending: dict[int, metrics_pb2.ReportMetricsRequest] = {}
        self._last_epoch = 0
        self._ended = False

    @property
    def dropped(self) -> int:
        """Reports given up (queue full, refused, or the suite stayed away past the flush)."""
        return self._sender.dropped

    # ---- the Trainer's events ---------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self._ended:  # the same callback in a second train(): a generated id starts anew
            self._ended, self._pending = False, {}
            if self._generated:
                self._last_epoch, self.reported = 0, {}
                self._created = datetime.now(timezone.utc)
                self.run_id = new_run_id(self._created, self._tried)
        if self.model_name is None and kwargs.get("model") is not None:
            self.model_name = model_name_of(kwargs["model"])

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or self._ended or state.epoch is None:
            return
        try:
            self._evaluated(args, state, metrics or {}, kwargs.get("model"))
        except Exception:  # reporting must never break the training
            log.exception("the evaluation at epoch %s could not be queued", state.epoch)

    def on_epoch_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and self._pending:
            self._submit_pending(stopped_early=False)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or self._ended:
            return
        self._ended = True
        self._submit_pending(stopped_early=True)
        self.flush(self.flush_timeout)

    # ---- reporting --------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Waits (at most `timeout` s, default flush_timeout) for every queued report to be
        sent; then, at the end of training, gives up the rest (logged). Whether all went."""
        done = self._sender.flush(self.flush_timeout if timeout is None else timeout)
        if self._ended:
            left = self._sender.close()
            if left:
                log.warning(
                    "%d epoch report(s) of %s could not be sent within %.1f s and are dropped "
                    "(is the suite running at %s?)",
                    left,
                    self.run_id,
                    self.flush_timeout if timeout is None else timeout,
                    self._client.settings.metrics_addr,
                )
            if self._owns_client:
                self._client.close()
        return done

    def _evaluated(
        self,
        args: TrainingArguments,
        state: TrainerState,
        metrics: Mapping[str, Any],
        model: Any,
    ) -> None:
        epoch = epoch_index(float(state.epoch or 0))
        if epoch < 1 or epoch <= self._last_epoch:
            return  # before training (eval_on_start), or an epoch reported already
        loss = metrics.get(self.metric)
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            log.warning(
                "no finite %r in the evaluation metrics (%s): epoch %d is not reported",
                self.metric,
                ", ".join(sorted(metrics)),
                epoch,
            )
            return
        if self.model_name is None:
            self.model_name = model_name_of(model)
        planned = int(state.num_train_epochs or 0) or math.ceil(args.num_train_epochs)
        request = metrics_pb2.ReportMetricsRequest(
            run_id=self.run_id, epoch=epoch, total_epochs=max(planned, epoch)
        )
        request.val_losses[self.model_name] = float(loss)
        train_loss = logged(state.log_history, epoch, "loss")
        if train_loss is not None:
            request.train_losses[self.model_name] = train_loss
        rate = logged(state.log_history, epoch, "learning_rate")
        if rate is not None and rate > 0:  # the suite's lr_multipliers: the rate in force
            request.lr_multipliers[self.model_name] = rate
        for earlier in [e for e in self._pending if e < epoch]:  # epochs already over
            self._queue(self._pending.pop(earlier))
        self._pending[epoch] = request
        if epoch >= request.total_epochs:
            self._submit_pending(stopped_early=False)

    def _submit_pending(self, *, stopped_early: bool) -> None:
        for epoch in sorted(self._pending):
            request = self._pending.pop(epoch)
            if stopped_early and not self._pending and epoch < request.total_epochs:
                # the Trainer stopped before its planned last epoch: this report ends the run
                request.auto_stop_info.CopyFrom(training_pb2.AutoStopInfo(triggered=True))
            self._queue(request)

    def _queue(self, request: metrics_pb2.ReportMetricsRequest) -> None:
        self._last_epoch = max(self._last_epoch, request.epoch)
        self._sender.submit(request)

    def _send(self, request: metrics_pb2.ReportMetricsRequest) -> int:
        """In the sending thread: the report under the callback's run id now."""
        request.run_id = self.run_id
        try:
            return self._client.send_report(request)
        except Conflict:
            if not self._generated or self.reported or len(self._tried) >= _RENAMES:
                raise
            # the generated id was taken by another run first: move on to the next free one
            self._tried.add(self.run_id)
            previous = self.run_id
            self.run_id = new_run_id(self._created, self._tried)
            log.warning("run id %s is taken by another run; reporting as %s", previous, self.run_id)
            raise _RetryNow from None

    def _delivered(self, request: metrics_pb2.ReportMetricsRequest, seq: int) -> None:
        self.reported[request.epoch] = seq
        log.debug("epoch %d of %s reported (seq %d)", request.epoch, request.run_id, seq)
