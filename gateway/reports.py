"""Outside trainers' reports, passed on to the metrics service in batches.

Every `POST …/metrics` would otherwise cost one gRPC call, and a gRPC call costs more than the
report itself on both sides. Reports that arrive while a batch is in flight wait for it and go
together in the next `ReportMetricsBatch` call (group commit, as the metrics store does with its
writes): one report alone is sent at once, many concurrent ones share calls. Each report is
still stored or refused on its own, and answered with its own result.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from services.api import metrics_pb2

SendBatch = Callable[
    [Sequence[metrics_pb2.ReportMetricsRequest]], Awaitable[Sequence[metrics_pb2.ReportResult]]
]
_Waiting = tuple[metrics_pb2.ReportMetricsRequest, "asyncio.Future[metrics_pb2.ReportResult]"]


class ReportBatcher:
    """Sends reports through `send` (one ReportMetricsBatch call), at most `max_batch` a call
    and one call at a time, so that reports of one run keep their order."""

    def __init__(self, send: SendBatch, max_batch: int = 256) -> None:
        self._send = send
        self.max_batch = max_batch
        self._waiting: list[_Waiting] = []
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, report: metrics_pb2.ReportMetricsRequest) -> metrics_pb2.ReportResult:
        """The report's result; raises what the call raised when the batch could not be sent
        (the service is down: every report of the batch gets that answer)."""
        if self._closed:
            raise RuntimeError("the gateway is shutting down")
        future: asyncio.Future[metrics_pb2.ReportResult] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting.append((report, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting(), name="report-batches")
        return await future

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self.max_batch]
                del self._waiting[: self.max_batch]
                try:
                    results = await self._send([report for report, _ in batch])
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as error:  # the call failed: every report of it did
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                if len(results) != len(batch):
                    mismatch = RuntimeError(
                        f"the metrics service answered {len(results)} results for "
                        f"{len(batch)} reports"
                    )
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(mismatch)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():  # its client may have gone away
                        future.set_result(result)
        finally:
            self._sender = None

    async def close(self) -> None:
        """Shutdown: the batch in flight and those waiting are cancelled."""
        self._closed = True
        for _, future in self._waiting:
            future.cancel()
        self._waiting.clear()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
