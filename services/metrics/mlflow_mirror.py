"""Mirrors every run the metrics service stores into MLflow, when MLFLOW_TRACKING_URI (or
`--mlflow-tracking-uri`) is set; otherwise this module is never imported, nor is mlflow.

The mirror reads the store, not the event path: an asyncio task takes the store's backlog (runs
with events MLflow has not taken, by the position saved per run in `mirror_positions`), plans each
run's calls (`mlflow_plan`) and hands every MLflow call to a thread of its own. The event path
(follower or report -> store -> subscribers) never waits on it: a write only wakes it. Because
the position is saved in the store after each run's calls, the mirror catches up after MLflow was
down or the service restarted, from where it stopped. MLflow down: one warning per outage, calls
retried with backoff (0.5 s, doubling, at most 30 s); nothing else changes.

Calls go through MLflow's own client (`MlflowClient`). Its HTTP retries are turned off and its
timeout shortened (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, MLFLOW_HTTP_REQUEST_TIMEOUT=10 unless set):
the mirror retries itself, and a stop must not wait minutes for a dead server. Its printing of
run URLs and its usage telemetry (threads posting to MLflow's servers) are turned off
(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, MLFLOW_DISABLE_TELEMETRY =true unless set).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from services.core.errors import InvalidInput
from services.metrics.mlflow_plan import (
    RUNNING,
    TAG_RUN_ID,
    Opening,
    Pace,
    Step,
    chunked,
    opening,
    plan_steps,
)
from services.metrics.records import MirrorPosition, RunRecord
from services.metrics.store import MetricsStore

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("oneseek.metrics.mlflow")

T = TypeVar("T")

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "oneseek"
THREAD_NICE = 10
PAGE_SIZE = 128
"""Events read (and decoded) at a time: about two calls' worth of epochs, so a backlog paced
over minutes is not decoded far ahead of what is sent."""


@dataclass(frozen=True)
class MirrorConfig:
    """Where the mirror writes, and how it paces itself."""

    tracking_uri: str
    experiment: str = DEFAULT_EXPERIMENT
    linger: float = 0.5
    """Seconds to wait after a write wakes the mirror, so that an epoch's events go in one call."""
    busy_share: float = 0.05
    """The most of the wall clock a backlog may spend waiting on MLflow (see `Pace`)."""
    burst: float = 0.5
    """Seconds of MLflow calls allowed back to back before the share applies."""
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    request_timeout: int = 10
    """MLFLOW_HTTP_REQUEST_TIMEOUT unless the environment sets it."""

    @property
    def target(self) -> str:
        """The key of this MLflow experiment's positions in the store (no credentials)."""
        return f"mlflow {public_uri(self.tracking_uri)} {self.experiment}"


def mirror_config(
    tracking_uri: str | None = None, experiment: str | None = None
) -> MirrorConfig | None:
    """The mirror's settings from the flags, else the environment; None when no tracking URI is
    set (the mirror is off). Refused when mlflow is not installed (checked without importing)."""
    uri = tracking_uri or os.environ.get(TRACKING_URI_ENV)
    if not uri:
        return None
    if importlib.util.find_spec("mlflow") is None:
        raise InvalidInput(
            f"{TRACKING_URI_ENV} (or --mlflow-tracking-uri) asks for an MLflow mirror, but mlflow "
            "is not installed: pip install 'oneseek[mlflow]', or unset it.",
            field=TRACKING_URI_ENV,
        )
    name = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    return MirrorConfig(uri, name)


def public_uri(uri: str) -> str:
    """`uri` without the user and password it may carry (fit for logs and keys)."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


class TrackerUnavailable(Exception):
    """MLflow did not answer, or failed on its side: try again later."""


class TrackerRefused(Exception):
    """MLflow answered that this call can never succeed (e.g. a param changed, a run deleted)."""


# ---- the MLflow side: on the mirror's thread only ----------------------------------------------


class MlflowTracker:
    """MlflowClient calls, with their errors sorted into unavailable and refused."""

    def __init__(self, config: MirrorConfig) -> None:
        self.config = config
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    def connect(self) -> None:
        """Imports mlflow (a second or so, once) and makes the client; no request yet."""
        if self._client is not None:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.config.request_timeout))
        # set_terminated would print the run's URL to stdout (and ask MLflow for the run first)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # MLflow's client reports its usage to MLflow's servers from threads of its own
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.config.tracking_uri)

    @property
    def client(self) -> MlflowClient:
        self.connect()
        assert self._client is not None
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = _sorted_errors(self._experiment)
        return self._experiment_id

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.config.experiment
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return str(self.client.create_experiment(name))
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.get_experiment_by_name(name)
                assert found is not None
        if found.lifecycle_stage == "deleted":  # nothing can be mirrored until it is fixed
            raise TrackerUnavailable(
                f"MLflow experiment {name!r} is deleted: restore it in MLflow, or set "
                f"{EXPERIMENT_ENV} / --mlflow-experiment to another name."
            )
        return str(found.experiment_id)

    def open_run(self, start: Opening) -> str:
        """The MLflow run of oneseek run `start.run_id`: the one tagged with it (a run opened
        before the service last stopped), else a new one; its params logged either way."""
        return _sorted_errors(self._open_run, start)

    def _open_run(self, start: Opening) -> str:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        experiment = self.experiment_id()
        found = self.client.search_runs(
            [experiment], f"tags.`{TAG_RUN_ID}` = '{start.run_id}'", max_results=1
        )
        if found:
            run_id = str(found[0].info.run_id)
        else:
            run = self.client.create_run(
                experiment,
                start_time=start.start_time_ms,
                tags=dict(start.tags),
                run_name=start.run_id,
            )
            run_id = str(run.info.run_id)
        for piece in chunked(start.params):
            try:
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in piece.items()])
            except MlflowException as error:
                if not _refusal(error):
                    raise
                # a run found by its tag with other params (its id reused by another run): the
                # metrics still go to it, under the params it has
                log.warning("MLflow kept the params run %s had: %s", start.run_id, _brief(error))
                break
        return run_id

    def log(self, run_id: str, step: Step) -> None:
        _sorted_errors(self._log, run_id, step)

    def _log(self, run_id: str, step: Step) -> None:
        from mlflow.entities import Metric, RunTag

        if step.metrics or step.tags:
            self.client.log_batch(
                run_id,
                metrics=[Metric(p.key, p.value, p.timestamp_ms, p.step) for p in step.metrics],
                tags=[RunTag(k, v) for k, v in step.tags.items()],
            )
        if step.status == RUNNING:
            self.client.update_run(run_id, status=RUNNING)
        elif step.status is not None:
            self.client.set_terminated(run_id, status=step.status, end_time=step.end_time_ms)


def _sorted_errors(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)`, its failure raised as TrackerUnavailable or TrackerRefused."""
    from mlflow.exceptions import MlflowException

    try:
        return call(*args)
    except (TrackerRefused, TrackerUnavailable):
        raise
    except MlflowException as error:
        if _refusal(error):
            raise TrackerRefused(str(error)) from error
        raise TrackerUnavailable(str(error)) from error
    except Exception as error:  # the transport's own (a timeout, a reset connection)
        raise TrackerUnavailable(f"{type(error).__name__}: {error}") from error


def _refusal(error: Any) -> bool:
    """Whether an MlflowException says the request is wrong and will stay so (4xx), rather than
    that MLflow is not there or not ready (5xx: its client reports "connection refused" as a 500;
    408, 429)."""
    status: int = error.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


def _brief(error: Exception, limit: int = 300) -> str:
    """The first line of `error`'s message, its middle cut when long (MLflow's messages end with
    the cause, e.g. "Connection refused")."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]} … {text[-limit // 2 :]}"


class _CallThread:
    """One daemon thread that runs the mirror's MLflow calls in order. A daemon, so that a call
    hung on a dead server never holds up the process's exit; `stop` joins it within a bound."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="mlflow-mirror", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return asyncio.wrap_future(future)

    def _work(self) -> None:
        # below the event loop's thread when the CPU is short (on Linux a thread's nice value is
        # its own): MLflow's client spends CPU on every call, the event path must not wait on it
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), THREAD_NICE)
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:
                future.set_exception(error)

    def stop(self, timeout: float) -> bool:
        """Ends the thread after its current call; whether it ended within `timeout`."""
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


# ---- the mirror: on the event loop ---------------------------------------------------------------


class MlflowMirror:
    """Owns the mirror's task and thread: `start`, `notify` after every store write, `stop`."""

    def __init__(
        self, store: MetricsStore, config: MirrorConfig, tracker: MlflowTracker | None = None
    ) -> None:
        self.store = store
        self.config = config
        self.tracker = tracker or MlflowTracker(config)
        self.mirrored_events = 0
        """Events taken by MLflow since the start (for tests and readings)."""
        self.unavailable_since: float | None = None
        """When MLflow stopped answering (time.monotonic()); None while it answers."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread: _CallThread | None = None
        self._pace = Pace(config.busy_share, config.burst, time.monotonic())
        self._refused: set[str] = set()

    def start(self) -> None:
        self._thread = _CallThread()
        self._task = asyncio.create_task(self._run(), name="mlflow-mirror")
        log.info(
            "mirroring runs into MLflow tracking_uri=%s experiment=%s",
            public_uri(self.config.tracking_uri),
            self.config.experiment,
        )

    def notify(self) -> None:
        """Something was stored: mirror it soon. Never waits."""
        self._wake.set()

    async def stop(self, timeout: float = 2.0) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._thread is not None:
            thread, self._thread = self._thread, None
            if not await asyncio.to_thread(thread.stop, timeout):
                log.warning("an MLflow call was still running at stop; left to its timeout")

    async def _run(self) -> None:
        assert self._thread is not None
        try:
            await self._thread.call(self.tracker.connect)
        except Exception:  # a broken mlflow install: the service goes on without its mirror
            log.exception("the MLflow mirror could not start; runs are not mirrored")
            return
        delay = self.config.backoff_initial
        self._wake.set()  # whatever was stored while the service (or its mirror) was off
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.config.linger)
            self._wake.clear()
            try:
                await self.sync()
            except TrackerUnavailable as error:
                self._unavailable(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max)
                self._wake.set()
                continue
            except Exception:
                log.exception("mirroring into MLflow failed; trying again")
                await asyncio.sleep(self.config.backoff_max)
                self._wake.set()
                continue
            delay = self.config.backoff_initial
            if self.unavailable_since is not None:
                log.info(
                    "MLflow answers again after %.0f s; the mirror caught up",
                    time.monotonic() - self.unavailable_since,
                )
                self.unavailable_since = None

    def _unavailable(self, error: Exception) -> None:
        if self.unavailable_since is None:
            self.unavailable_since = time.monotonic()
            log.warning(
                "MLflow is unavailable (%s): runs are still stored and served; the mirror "
                "catches up when it answers tracking_uri=%s",
                _brief(error),
                public_uri(self.config.tracking_uri),
            )

    async def sync(self) -> None:
        """Mirrors every run's stored events that MLflow has not taken yet."""
        for record, position in await self.store.mirror_backlog(self.config.target):
            await self._mirror_run(record, position)

    async def _mirror_run(self, record: RunRecord, position: MirrorPosition | None) -> None:
        if position is None:
            try:
                external_id = await self._call(self.tracker.open_run, opening(record))
            except TrackerRefused as error:  # tried again at the next pass
                self._log_refusal(record.run_id, record.last_seq, error)
                return
            position = MirrorPosition(record.run_id, external_id)
            await self.store.save_mirror_position(self.config.target, position)
        while True:
            events = await self.store.events(record.run_id, position.seq, limit=PAGE_SIZE)
            if not events:
                return
            saved = position
            try:
                for step in plan_steps(events, position.status):
                    if step.calls:
                        try:
                            await self._call(self.tracker.log, position.external_id, step)
                        except TrackerRefused as error:
                            self._log_refusal(record.run_id, step.seq, error)
                    self.mirrored_events += sum(
                        1 for e in events if position.seq < e.seq <= step.seq
                    )
                    position = replace(
                        position, seq=step.seq, status=step.status or position.status
                    )
            finally:
                if position != saved:
                    await self.store.save_mirror_position(self.config.target, position)
            if len(events) < PAGE_SIZE:
                return

    def _log_refusal(self, run_id: str, seq: int, error: TrackerRefused) -> None:
        # skipped, so that one bad call never holds up the rest; said once per run
        level = logging.DEBUG if run_id in self._refused else logging.ERROR
        self._refused.add(run_id)
        log.log(
            level,
            "MLflow refused part of run %s (events up to seq %d not mirrored): %s",
            run_id,
            seq,
            _brief(error),
        )

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the mirror's thread, within the pace."""
        assert self._thread is not None
        rest = self._pace.rest(time.monotonic())
        if rest > 0:
            await asyncio.sleep(rest)
        began = time.monotonic()
        try:
            return await self._thread.call(fn, *args)
        finally:
            self._pace.spend(time.monotonic() - began, time.monotonic())
