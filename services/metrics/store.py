"""Where the metrics service keeps runs, events and its follower cursor: the `MetricsStore`
protocol, and `open_store`, which picks the implementation a database URL names.

The protocol is async so that a PostgreSQL store (asyncpg, several replicas sharing one
database) can stand behind it later without touching the service.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from services.api import training_pb2
from services.core.errors import InvalidInput
from services.core.layout import state_dir
from services.metrics.records import MirrorPosition, RunRecord
from services.metrics.sqlite_store import SQLiteStore, sqlite_path

__all__ = ["MetricsStore", "SQLiteStore", "default_db_url", "open_store", "sqlite_path"]


class MetricsStore(Protocol):
    """Everything the metrics service persists. Every method is safe to call from the event loop:
    implementations do their I/O off it."""

    async def append_events(
        self,
        events: Sequence[training_pb2.TrainingEvent],
        *,
        cursor: int | None = None,
        runs: Sequence[RunRecord] = (),
    ) -> list[training_pb2.TrainingEvent]:
        """In one transaction: create the rows of `runs` (an existing row only gains a config or
        models it lacked), insert `events` (one already stored under its (run_id, seq) is
        skipped), move each run's summary, and set the follower cursor when given.
        Returns the events that were new, in the order given."""
        ...

    async def events(
        self, run_id: str, after_seq: int = 0, limit: int | None = None
    ) -> list[training_pb2.TrainingEvent]:
        """The run's events with seq > after_seq, in seq order, at most `limit`."""
        ...

    async def run(self, run_id: str) -> RunRecord | None: ...

    async def list_runs(self, status: str | None = None, limit: int = 0) -> list[RunRecord]:
        """Runs newest first (by created_at, then run id); only `status` when given; 0 = all."""
        ...

    async def cursor(self) -> int:
        """The follower's position in the training service's global stream (0 at first)."""
        ...

    async def mirror_backlog(self, target: str) -> list[tuple[RunRecord, MirrorPosition | None]]:
        """Runs with events the outside tracker `target` has not taken yet, oldest first, each
        with its position there (None: never mirrored into `target`)."""
        ...

    async def save_mirror_position(self, target: str, position: MirrorPosition) -> None:
        """Records how far `position.run_id` has been mirrored into `target`."""
        ...

    async def close(self) -> None: ...


def default_db_url() -> str:
    """ONESEEK_DB_URL, else a SQLite file under the suite's state folder (var/ by default)."""
    configured = os.environ.get("ONESEEK_DB_URL")
    if configured:
        return configured
    return f"sqlite:///{state_dir() / 'metrics.db'}"


async def open_store(db_url: str) -> MetricsStore:
    """The store a database URL names: `sqlite:///path` or a plain path today."""
    scheme = db_url.split("://", 1)[0].lower() if "://" in db_url else ""
    if scheme in ("postgresql", "postgres"):
        # the URL is not repeated: it may carry a password
        raise InvalidInput(
            "PostgreSQL is not available yet as a metrics store (the store protocol is ready "
            "for it); set ONESEEK_DB_URL / --db-url to "
            "sqlite:///path/to/metrics.db for now.",
            field="db_url",
        )
    if scheme not in ("", "sqlite"):
        raise InvalidInput(
            f"Unsupported database URL scheme {scheme!r}: use sqlite:///path/to/metrics.db "
            "or a plain file path.",
            field="db_url",
        )
    store = SQLiteStore(sqlite_path(db_url))
    await store.open()
    return store
