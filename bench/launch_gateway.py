"""The real gateway, optionally logging when each event reaches it:
`python bench/launch_gateway.py --port P [--stamps FILE] [--leaderboard-over-grpc]`.

--leaderboard-over-grpc turns off the leaderboard's answer from the run's feed, so every GET
makes one GetLeaderboard call, as before that fix: the "before" figure of bench/README.md,
measured in the same run as the "after".

With --stamps, every event a run's feed receives from the metrics service is logged as
`<run id> <seq> <monotonic time>` before the feed fans it out: the start of the fan-out,
measured in the gateway on the clock every process shares, at one small write per event.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO

from gateway import feeds
from services.api import training_pb2
from services.cli import main


def log_receipts(path: str) -> None:
    log: IO[str] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - for life
    receive = feeds.RunFeed._receive

    def stamped(self: feeds.RunFeed, event: training_pb2.TrainingEvent) -> None:
        log.write(f"{event.run_id} {event.seq} {time.monotonic()!r}\n")
        receive(self, event)

    feeds.RunFeed._receive = stamped  # type: ignore[method-assign]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stamps")
    parser.add_argument("--profile", help="write a cProfile of the whole run to this file")
    parser.add_argument("--leaderboard-over-grpc", action="store_true")
    args, rest = parser.parse_known_args()
    if args.stamps:
        log_receipts(args.stamps)
    if args.leaderboard_over_grpc:

        async def no_answer(self: feeds.RunFeeds, run_id: str) -> bytes | None:
            return None

        feeds.RunFeeds.leaderboard = no_answer  # type: ignore[method-assign]
    if args.profile:
        import cProfile

        with cProfile.Profile() as profile:
            code = main(["gateway", "--host", "127.0.0.1", *rest])
        profile.dump_stats(args.profile)
        sys.exit(code)
    sys.exit(main(["gateway", "--host", "127.0.0.1", *rest]))
