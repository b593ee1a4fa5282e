"""The README's REST examples, run as written against the real suite: every `curl` command of
its "REST API" section must answer the status shown under it, with the fields shown."""

from __future__ import annotations

import json
import re
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.processes import REPO, GatewayProcess, ServiceProcess, workspace_env

pytestmark = pytest.mark.slow

TOKEN = "readme-token"
COMPARED = ("status", "error", "success", "version")  # values that must be as shown


@dataclass
class Example:
    command: str
    status: int
    shown: str  # the answer as the README shows it, with … for what varies


def readme_examples() -> list[Example]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## REST API\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    examples: list[Example] = []
    lines = block.replace("\\\n", " ").splitlines()
    for index, line in enumerate(lines):
        if line.startswith("curl "):
            answer = re.match(r"# → (\d{3}) (.*)$", lines[index + 1])
            assert answer, f"README: no '# → STATUS …' line under {line!r}"
            examples.append(Example(line, int(answer.group(1)), answer.group(2)))
    return examples


def shown_shape(shown: str) -> Any:
    """The README's answer as JSON, with what it elides made empty."""
    text = shown.split("}; ")[0] if shown.startswith("{") else shown
    text = text.replace("[...]", "[]").replace("{…}", "{}").replace("…", "")
    text = re.sub(r",\s*([}\]])", r"\1", text)  # a trailing ", " left by an elision
    text = re.sub(r"\{\s*,", "{", text)
    text = re.sub(r'"([a-z-]*):"', r'"\1"', text)  # "dna-v2:…" -> a plain string
    return json.loads(text)


def check_shape(shown: Any, actual: Any, where: str) -> None:
    if isinstance(shown, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        for key, value in shown.items():
            assert key in actual, f"{where}: no {key!r} in {sorted(actual)}"
            if key in COMPARED and not isinstance(value, (dict, list)):
                assert actual[key] == value, f"{where}.{key}: {actual[key]!r} != {value!r}"
            check_shape(value, actual[key], f"{where}.{key}")
    elif isinstance(shown, list) and shown:
        assert isinstance(actual, list) and actual, f"{where}: expected a non-empty list"
        check_shape(shown[0], actual[0], f"{where}[0]")


def run_curl(command: str, variables: dict[str, str]) -> tuple[int, Any]:
    """The curl command with urllib: -X, -H, -d and the URL are all the README uses."""
    for name, value in variables.items():
        command = command.replace(f"${name}", value)
    args = shlex.split(command)[1:]
    method, headers, data, url = None, {}, None, None
    while args:
        arg = args.pop(0)
        if arg == "-s":
            continue
        if arg == "-X":
            method = args.pop(0)
        elif arg == "-H":
            name, _, value = args.pop(0).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            data = args.pop(0).encode()
        else:
            assert url is None and arg.startswith("http"), f"unexpected curl argument {arg!r}"
            url = arg
    assert url is not None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path
) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("readme")
    env = workspace_env(root, demo_models_dir, ONESEEK_ADMIN_TOKEN=TOKEN)
    # the README's dataset id, with the 60 records of "small" so that an epoch takes seconds
    datasets = Path(env["DATASETS_DIR"])
    (datasets / "small.jsonl").rename(datasets / "sample.jsonl")
    training = ServiceProcess("training-service", env=env, log=root / "training.log").start()
    metrics = ServiceProcess(
        "metrics-service", "--training-addr", training.addr, env=env, log=root / "metrics.log"
    ).start()
    services = {"ONESEEK_TRAINING_ADDR": training.addr, "ONESEEK_METRICS_ADDR": metrics.addr}
    gateway = GatewayProcess({**env, **services}, root / "gateway.log", TOKEN).start()
    yield gateway
    assert gateway.stop() == 0, gateway.output()
    assert metrics.stop() == 0, metrics.output()
    assert training.stop() == 0, training.output()


def wait_for(gateway: GatewayProcess, path: str, done: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not done(gateway.get(path)):
        assert time.monotonic() < deadline, f"{path} did not get there in {timeout} s"
        time.sleep(0.2)


def test_every_readme_example_answers_as_shown(gateway: GatewayProcess) -> None:
    examples = readme_examples()
    assert len(examples) >= 14  # every REST route but the websocket and page
    variables = {"GATEWAY": gateway.url, "TOKEN": TOKEN}
    for example in examples:
        run = variables.get("RUN")
        if run and "/metrics" in example.command and "-X POST" not in example.command:
            # "current_epoch": 1 as shown: wait for the first epoch to end
            wait_for(gateway, f"/api/training/{run}/metrics", lambda m: m["current_epoch"] >= 1)
        if run and example.command.endswith("/api/training/runs"):
            runs = f"/api/training/{run}/metrics"
            wait_for(gateway, runs, lambda m: m["status"] != "running")
        status, answer = run_curl(example.command, variables)
        assert status == example.status, f"{example.command}\n→ {status} {answer}"
        check_shape(shown_shape(example.shown), answer, example.command)
        if "start-dna-v2" in example.command:
            variables["RUN"] = answer["runId"]
