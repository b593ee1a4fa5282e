"""/static/trainingConfig.js, the ES module of the training config the page and Node tools import,
run under Node against the Python it is generated from: TRAINING_CONFIG is Python's (read-only),
generateRunId() gives Python's ids, validateBaseModels() refuses what Python refuses in the same
words. Skipped where Node is not installed (CI installs it and fails instead)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.page import training_config_module
from gateway.settings import STATIC_DIR
from services.core.errors import InvalidInput, NotFound
from services.core.training_config import generate_run_id, get_config, validate_base_models

NODE = shutil.which("node")
if NODE is None:
    if os.environ.get("CI"):
        pytest.fail("node is missing: `make browser` installs Debian's nodejs")
    pytest.skip("node is missing: run `make browser`", allow_module_level=True)

SCRIPT = """
import { readFileSync } from "node:fs";
const module = await import(process.argv[2]);
const input = JSON.parse(readFileSync(0, "utf8"));
const out = { config: module.TRAINING_CONFIG, ids: [], models: [] };
try { module.TRAINING_CONFIG.defaults.epochs = 99; out.mutable = true; }
catch { out.mutable = module.TRAINING_CONFIG.defaults.epochs !== 3; }
for (const [iso, taken] of input.ids) {
  const set = new Set(taken);
  out.ids.push(module.generateRunId(new Date(iso), (id) => set.has(id)));
}
for (const [names, available] of input.models) {
  try { out.models.push({ ok: module.validateBaseModels(names, available ?? undefined) }); }
  catch (error) {
    out.models.push({ message: error.message, field: error.field, kind: error.kind });
  }
}
console.log(JSON.stringify(out));
"""


def run_module(tmp_path: Path, cases: dict[str, Any]) -> dict[str, Any]:
    module = tmp_path / "trainingConfig.mjs"
    module.write_text(training_config_module(STATIC_DIR), encoding="utf-8")
    script = tmp_path / "check.mjs"
    script.write_text(SCRIPT, encoding="utf-8")
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(script), module.as_uri()],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def python_verdict(names: Any, available: list[str] | None) -> dict[str, Any]:
    try:
        return {"ok": validate_base_models(names, available)}
    except (InvalidInput, NotFound) as error:
        kind = "not_found" if isinstance(error, NotFound) else "invalid_input"
        return {"message": error.message, "field": error.field, "kind": kind}


NAME_CASES: list[tuple[Any, list[str] | None]] = [
    (None, None),
    ([], None),
    ("tiny-gpt2", None),
    ({"a": 1}, None),
    (["a", "b", "a"], None),
    ([f"m{i}" for i in range(11)], None),
    ([f"m{i}" for i in range(10)], None),
    (["../x"], None),
    (["/abs"], None),
    (["a/b"], None),
    (["ok", 7], None),
    (["it's"], None),
    (["a..b"], None),
    (["tiny-gpt2\n"], None),
    (["tiny-gpt2", "tiny-llama"], None),
    (["tiny-llama", "ghost"], ["tiny-llama", "b-model", "a-model"]),
    (["ghost"], []),
    (["tiny-llama"], ["tiny-llama"]),
]


def random_cases(count: int) -> list[tuple[Any, None]]:
    """Lists of names drawn from an alphabet that crosses every rule of the pattern."""
    rng = random.Random(9)
    alphabet = "ab9._-/ Z'é"
    cases: list[tuple[Any, None]] = []
    for _ in range(count):
        names = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
            for _ in range(rng.randint(0, 3))
        ]
        cases.append((names, None))
    return cases


def test_the_module_gives_what_python_gives(tmp_path: Path) -> None:
    utc = timezone.utc
    moments = [
        (datetime(2026, 1, 31, 14, 25, 0, tzinfo=utc), []),
        (datetime(2026, 3, 1, 1, 30, 0, tzinfo=timezone(timedelta(hours=5))), []),
        (datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=utc), []),
        (datetime(2026, 1, 31, 14, 25, 0, tzinfo=utc), ["run-20260131-142500"]),
        (
            datetime(2026, 1, 31, 14, 25, 0, tzinfo=utc),
            ["run-20260131-142500", "run-20260131-142500-2"],
        ),
    ]
    names = NAME_CASES + random_cases(200)
    cases = {
        "ids": [[moment.isoformat(), taken] for moment, taken in moments],
        "models": [[list(n) if isinstance(n, tuple) else n, a] for n, a in names],
    }
    result = run_module(tmp_path, cases)

    assert result["config"] == get_config()
    assert result["mutable"] is False
    expected_ids = [
        generate_run_id(moment, exists=set(taken).__contains__) for moment, taken in moments
    ]
    assert result["ids"] == expected_ids
    assert result["ids"][1] == "run-20260228-203000"  # the offset is taken into account
    for (case, available), got in zip(names, result["models"], strict=True):
        assert got == python_verdict(case, available), case
    assert result["models"][1] == {
        "message": "No base models selected",
        "field": "baseModels",
        "kind": "invalid_input",
    }


async def test_the_gateway_serves_it_as_javascript(gateway: TestClient) -> None:
    reply = await gateway.get("/static/trainingConfig.js")
    assert reply.status == 200
    assert reply.content_type == "text/javascript"
    assert await reply.text() == training_config_module(STATIC_DIR)
    assert reply.headers["Cache-Control"] == "no-cache"
