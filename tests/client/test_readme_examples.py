"""The README's Python examples of "Plugging into your tools", run as written against the real
suite: each block is saved as a script outside the project folder and run from a folder laid
out as `make run` leaves the project (models/, datasets/sample.jsonl, var/admin_token), with
the suite's addresses in the environment, as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client.conftest import ADMIN, Suite
from tests.processes import REPO

pytestmark = pytest.mark.slow


def python_block(subsection: str) -> str:
    """The first ```python block under the README's `### <subsection>` heading."""
    text = (REPO / "README.md").read_text()
    part = text.split(f"\n### {subsection}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return part.split("```python\n", 1)[1].split("```", 1)[0]


def run_example(suite: Suite, subsection: str, folder: Path) -> list[str]:
    script = folder / "example.py"
    folder.mkdir()
    script.write_text(python_block(subsection))
    # as after `make run`: the addresses in the environment (here not the defaults), the admin
    # token in var/admin_token only
    token = suite.work / "var" / "admin_token"
    token.parent.mkdir(exist_ok=True)
    token.write_text(ADMIN + "\n")
    token.chmod(0o600)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ONESEEK_")}
    env.update(
        HF_HUB_OFFLINE="1",
        ONESEEK_TRAINING_ADDR=suite.training.addr,
        ONESEEK_METRICS_ADDR=suite.metrics.addr,
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=suite.work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()


def test_the_python_client_example(suite: Suite, tmp_path: Path) -> None:
    lines = run_example(suite, "Python client", tmp_path / "client")
    assert [line.split(" ", 1)[0] for line in lines[:2]] == ["1", "2"]  # the two epoch_ends
    assert "'tiny-llama'" in lines[0] and "'tiny-qwen2'" in lines[0]
    board = [line.split(" ")[:2] for line in lines[2:4]]
    assert sorted(board) in (
        [["1", "tiny-llama"], ["2", "tiny-qwen2"]],
        [["1", "tiny-qwen2"], ["2", "tiny-llama"]],
    )
    assert lines[4].startswith("runId ") and "run-20000101-000000" in lines[4]


def test_the_trainer_callback_example(suite: Suite, tmp_path: Path) -> None:
    lines = run_example(suite, "Reporting from your own Trainer", tmp_path / "trainer")
    found = re.fullmatch(r"(run-\d{8}-\d{6}(?:-\d+)?) \{1: \d+, 2: \d+\}", lines[-1])
    assert found, lines[-1]
    run_id = found.group(1)
    metrics = suite.rest(f"/api/training/{run_id}/metrics")
    assert metrics["status"] == "completed" and metrics["current_epoch"] == 2
    assert [list(h["val_losses"]) for h in metrics["training_history"]] == [["tiny-gpt2"]] * 2
    board = suite.rest(f"/api/training/{run_id}/leaderboard")
    assert [e["model_name"] for e in board["leaderboard"]] == ["tiny-gpt2"]
    runs = suite.rest("/api/training/runs")["runs"]
    assert run_id in [run["run_id"] for run in runs]
