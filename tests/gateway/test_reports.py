"""The gateway's report batcher: concurrent reports share calls, keep their order, and each
gets its own result; a failed call fails exactly the reports it carried."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.reports import ReportBatcher
from services.api import metrics_pb2


def report(epoch: int) -> metrics_pb2.ReportMetricsRequest:
    return metrics_pb2.ReportMetricsRequest(run_id="run-20260101-120000", epoch=epoch)


class FakeService:
    """Answers each report with seq = its epoch, after a moment; fails the calls it is told."""

    def __init__(self, fail_calls: frozenset[int] = frozenset()) -> None:
        self.calls: list[list[int]] = []
        self.fail_calls = fail_calls

    async def send(
        self, reports: Sequence[metrics_pb2.ReportMetricsRequest]
    ) -> Sequence[metrics_pb2.ReportResult]:
        self.calls.append([r.epoch for r in reports])
        await asyncio.sleep(0.01)
        if len(self.calls) in self.fail_calls:
            raise ConnectionError(f"call {len(self.calls)} failed")
        return [metrics_pb2.ReportResult(seq=r.epoch) for r in reports]


async def test_concurrent_reports_share_calls_in_order() -> None:
    service = FakeService()
    batcher = ReportBatcher(service.send, max_batch=16)
    results = await asyncio.gather(*(batcher.submit(report(n)) for n in range(1, 41)))
    assert [r.seq for r in results] == list(range(1, 41))
    # all arrived before the first call: three calls of at most 16, in the reports' order
    assert service.calls == [list(range(1, 17)), list(range(17, 33)), list(range(33, 41))]
    # idle again: the next report is sent by itself, at once
    assert (await batcher.submit(report(41))).seq == 41
    assert service.calls[-1] == [41]


async def test_reports_that_come_during_a_call_wait_for_it_and_go_together() -> None:
    service = FakeService(fail_calls=frozenset({1}))
    batcher = ReportBatcher(service.send)
    first = [asyncio.ensure_future(batcher.submit(report(n))) for n in (1, 2)]
    await asyncio.sleep(0)  # the first call is in flight
    second = [asyncio.ensure_future(batcher.submit(report(n))) for n in (3, 4, 5)]
    outcomes = await asyncio.gather(*first, *second, return_exceptions=True)
    assert service.calls == [[1, 2], [3, 4, 5]]
    # the failed call fails exactly the reports it carried
    assert all(isinstance(o, ConnectionError) for o in outcomes[:2])
    assert [o.seq for o in outcomes[2:] if isinstance(o, metrics_pb2.ReportResult)] == [3, 4, 5]


async def test_close_cancels_what_waits() -> None:
    service = FakeService()
    batcher = ReportBatcher(service.send)
    pending = [asyncio.ensure_future(batcher.submit(report(n))) for n in range(1, 4)]
    await asyncio.sleep(0)  # the first call is in flight, two reports wait
    await batcher.close()
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    with pytest.raises(RuntimeError, match="shutting down"):
        await batcher.submit(report(4))
