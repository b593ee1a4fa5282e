"""The real metrics service, optionally logging when each event of the training stream reaches
its catalog and when it is published to subscribers (stored, folded, fanned out):
`python bench/launch_metrics.py --addr A [--stamps FILE]`. Lines: `<stage> <run id> <seq>
<monotonic time>`, with stage `in` (a batch handed to the store) or `out` (published).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from services.api import training_pb2
from services.cli import main
from services.metrics import catalog


def log_stages(path: str) -> None:
    log: IO[str] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - for life
    commit, publish = catalog.RunCatalog.commit, catalog.RunCatalog._publish

    async def commit_stamped(
        self: catalog.RunCatalog, events: Sequence[training_pb2.TrainingEvent], **kw: Any
    ) -> list[training_pb2.TrainingEvent]:
        now = time.monotonic()
        log.write("".join(f"in {e.run_id} {e.seq} {now!r}\n" for e in events))
        return await commit(self, events, **kw)

    def publish_stamped(self: catalog.RunCatalog, event: training_pb2.TrainingEvent) -> None:
        log.write(f"out {event.run_id} {event.seq} {time.monotonic()!r}\n")
        publish(self, event)

    catalog.RunCatalog.commit = commit_stamped  # type: ignore[method-assign]
    catalog.RunCatalog._publish = publish_stamped  # type: ignore[method-assign]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stamps")
    args, rest = parser.parse_known_args()
    if args.stamps:
        log_stages(args.stamps)
    sys.exit(main(["metrics-service", *rest]))
