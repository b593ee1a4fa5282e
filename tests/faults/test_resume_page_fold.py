"""The admin page's own fold (gateway/static/run_state.js) over a run that was interrupted and
resumed: it must read `running` again at the resumed epoch_start and end like the metrics
service's RunState does. Runs the module in Node; skipped where Node is not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.api.codec import event_to_dict
from services.api.run_state import fold
from services.metrics.records import record_from_run
from tests.metrics.sample_run import RUN_ID, interrupted_then_resumed, run_message

REPO = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")

SCRIPT = """
const source = require("fs").readFileSync(process.argv[1], "utf8");
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
import("data:text/javascript," + encodeURIComponent(source)).then((m) => {
  const run = m.createRun(input.run_id);
  const seen = [];
  for (const event of input.events) {
    m.applyEvent(run, event);
    seen.push({status: run.status, percent: run.progressPercent, error: run.error,
               finished: m.isFinished(run), epoch: m.displayEpoch(run)});
  }
  seen.push({history: run.history.map((h) => h.epoch), lastSeq: run.lastSeq});
  console.log(JSON.stringify(seen));
});
"""


if NODE is None:
    if os.environ.get("CI"):
        pytest.fail("node is missing: `make browser` installs Debian's nodejs")
    pytest.skip("node is missing: run `make browser`", allow_module_level=True)


def test_the_page_reads_a_resumed_run_as_running_then_completed() -> None:
    events = interrupted_then_resumed()
    payload = {"run_id": RUN_ID, "events": [event_to_dict(e) for e in events]}
    assert NODE is not None
    result = subprocess.run(
        [NODE, "-e", SCRIPT, str(REPO / "gateway" / "static" / "run_state.js")],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen: list[dict[str, Any]] = json.loads(result.stdout)
    cut = next(i for i, e in enumerate(events) if e.WhichOneof("payload") == "training_error")
    at_cut, resumed = seen[cut], seen[cut + 1]
    assert at_cut["status"] == "interrupted" and at_cut["finished"] and at_cut["percent"] == 100
    assert events[cut + 1].WhichOneof("payload") == "epoch_start"
    assert resumed["status"] == "running" and not resumed["finished"]
    assert resumed["error"] is None and resumed["epoch"] == 2
    # the same numbers the metrics service's fold gives
    state = record_from_run(run_message()).state()
    fold(state, events[: cut + 2])
    assert resumed["percent"] == pytest.approx(state.progress_percent)
    ending, summary = seen[-2], seen[-1]
    assert ending["status"] == "completed" and ending["error"] is None
    assert summary == {"history": [1, 2, 3], "lastSeq": events[-1].seq}


PLACEMENT_SCRIPT = """
const source = require("fs").readFileSync(process.argv[1], "utf8");
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
import("data:text/javascript," + encodeURIComponent(source)).then((m) => {
  const run = m.createRun(input.run_id);
  for (const event of input.events) m.applyEvent(run, event);
  console.log(JSON.stringify(run.models.map((model) => model.placement)));
});
"""


def test_the_page_shows_the_node_an_epoch_start_names_as_the_services_fold_does() -> None:
    from services.api import training_pb2
    from services.api.codec import message_to_dict, now_timestamp
    from services.api.run_state import RunState

    planned = [
        training_pb2.ModelInfo(name=n, placement=training_pb2.Placement(model=n, device="cpu"))
        for n in ("a", "b")
    ]
    state = RunState(RUN_ID, models=planned)
    first = state.initial_state(now_timestamp())
    start = training_pb2.TrainingEvent(run_id=RUN_ID, seq=1, timestamp=now_timestamp())
    start.epoch_start.epoch = 1
    start.epoch_start.placement.add(model="a", device="cpu", node="ab12/77")
    state.apply(start)
    payload = {"run_id": RUN_ID, "events": [event_to_dict(first), event_to_dict(start)]}
    assert NODE is not None
    result = subprocess.run(
        [NODE, "-e", PLACEMENT_SCRIPT, str(REPO / "gateway" / "static" / "run_state.js")],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    shown = json.loads(result.stdout)
    assert [p["node"] for p in shown] == ["ab12/77", ""]
    assert shown == [message_to_dict(m.placement) for m in state.models]
