"""The admin page's "Try it" panel in a real browser (Debian's chromium driven by Playwright)
against the real suite: a run trained for real over REST, then its models asked from the page,
their streamed answers checked against the same request to POST …/generate made here."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.browser import Problems, launched, require_chromium
from tests.processes import GatewayProcess, ServiceProcess, workspace_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output"
TOKEN = "try-it-test-token"
MODELS = ("tiny-llama", "tiny-gpt2")
PROMPT = "What is the capital of"
FINISHED = ("completed", "auto_stopped", "stopped")
ANSWER_TIMEOUT_MS = 120_000

require_chromium()

from playwright.sync_api import (  # noqa: E402 - only once chromium is known to be there
    Browser,
    Locator,
    Page,
    expect,
)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path
) -> Iterator[GatewayProcess]:
    env = workspace_env(
        tmp_path_factory.mktemp("try-it"), demo_models_dir, ONESEEK_ADMIN_TOKEN=TOKEN
    )
    logs = tmp_path_factory.mktemp("logs")
    training = ServiceProcess("training-service", env=env, log=logs / "training.log").start()
    metrics = ServiceProcess(
        "metrics-service", "--training-addr", training.addr, env=env, log=logs / "metrics.log"
    ).start()
    services = {"ONESEEK_TRAINING_ADDR": training.addr, "ONESEEK_METRICS_ADDR": metrics.addr}
    gateway = GatewayProcess({**env, **services}, logs / "gateway.log", TOKEN).start()
    yield gateway
    assert gateway.stop() == 0, gateway.output()
    assert metrics.stop() == 0, metrics.output()
    assert training.stop() == 0, training.output()


def post(gateway: GatewayProcess, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """POST `body` as JSON with the admin token: status, content type and the whole answer."""
    request = urllib.request.Request(
        gateway.url + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, reply.headers.get_content_type(), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), error.read()


def generate(gateway: GatewayProcess, run_id: str, body: dict[str, Any]) -> list[Any]:
    """The Server-Sent Events of POST …/generate as [(event, data)], or its refusal's envelope."""
    status, kind, answer = post(gateway, f"/api/training/{run_id}/generate", body)
    if status != 200:
        assert kind == "application/json", (status, kind)
        return [("refusal", status, json.loads(answer))]
    assert kind == "text/event-stream"
    events = []
    for block in answer.decode().split("\n\n"):
        if block:
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((fields["event"], json.loads(fields["data"])))
    assert events[-1][0] == "end", events[-3:]
    return events


@pytest.fixture(scope="module")
def run_id(gateway: GatewayProcess) -> str:
    """One short run of both models, started over REST and waited for until it finished."""
    status, _, answer = post(
        gateway,
        "/api/admin/training/start-dna-v2",
        {"datasetId": "small", "baseModels": list(MODELS), "epochs": 1, "maxSeqLength": 48},
    )
    assert status == 202, answer
    run: str = json.loads(answer)["runId"]
    deadline = time.monotonic() + 300
    while (state := gateway.get(f"/api/training/{run}/metrics")["status"]) == "running":
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.5)
    assert state in FINISHED, state
    return run


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched() as browser:
        yield browser


@pytest.fixture
def tab(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = Problems(page)
    yield page
    context.close()
    assert problems.seen == []


def open_run(tab: Page, gateway: GatewayProcess, run_id: str) -> Locator:
    """The page on `run_id` with the admin token in use; the Try it panel, ready."""
    tab.goto(f"{gateway.url}/#run={run_id}")
    tab.get_by_label("Admin token").fill(TOKEN)
    tab.get_by_role("button", name="Use token").click()
    panel = tab.locator("#try-panel")
    expect(panel.get_by_role("button", name="Generate")).to_be_visible()
    return panel


def js_number(value: float) -> str:
    """A number as the page's String(value) writes it: 0.0 is "0"."""
    return str(int(value)) if float(value).is_integer() else str(value)


def ask(panel: Locator, prompt: str, models: tuple[str, ...], **options: str) -> None:
    panel.get_by_label("Prompt").fill(prompt)
    for box in panel.get_by_role("checkbox").all():
        box.set_checked(box.get_attribute("value") in models)
    for label, value in options.items():
        panel.get_by_label(label, exact=True).fill(value)


def test_the_panel_asks_for_the_token_then_offers_the_run_s_models(
    gateway: GatewayProcess, run_id: str, tab: Page
) -> None:
    tab.goto(f"{gateway.url}/#run={run_id}")
    panel = tab.locator("#try-panel")
    expect(panel).to_be_visible()
    expect(panel.get_by_role("heading", name="Try it")).to_be_visible()
    # without the token: it says so, and takes the keyboard to where the token goes
    expect(panel).to_contain_text("Enter the admin token to try this run's models")
    expect(panel.get_by_label("Prompt")).to_be_hidden()
    panel.get_by_role("button", name="Enter the admin token").click()
    token = tab.get_by_label("Admin token")
    expect(token).to_be_focused()
    token.fill(TOKEN)
    token.press("Enter")
    expect(panel.get_by_label("Prompt")).to_be_visible()

    # the run's models, its best one ticked
    best = next(r for r in gateway.get("/api/training/runs")["runs"] if r["run_id"] == run_id)[
        "best_model"
    ]
    assert best in MODELS
    boxes = panel.get_by_role("checkbox")
    expect(boxes).to_have_count(len(MODELS))
    for name in MODELS:
        box = panel.get_by_role("checkbox", name=name)
        expect(box).to_be_checked(checked=name == best)
    expect(panel.locator("#try-models-count")).to_have_text(f"1 of {len(MODELS)}")

    # each option from /api/config: its label, default and limits, none written in the page
    options = gateway.get("/api/config")["generate_options"]
    assert [o["name"] for o in options] == ["maxNewTokens", "temperature", "topP", "seed"]
    for option in options:
        field = panel.get_by_label(option["label"], exact=True)
        expect(field).to_have_value(js_number(option["default"]))
        schema = option["schema"]
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        expect(field).to_have_attribute("min", js_number(low))
        expect(field).to_have_attribute("max", js_number(schema["maximum"]))
        expect(panel.locator(f"#try-{option['name']}-hint")).to_have_text(option["hint"])
    expect(panel.get_by_label("Stop text")).to_have_value("")
    expect(panel.get_by_role("button", name="Stop", exact=True)).to_be_disabled()

    # a run that is not finished has nothing to try: a fresh page on no run shows no panel
    tab.goto(f"{gateway.url}/#run=run-20000101-000000")
    expect(tab.locator("#feed-status")).to_have_attribute("data-state", "error")
    expect(panel).to_be_hidden()


def test_both_models_answer_side_by_side_as_the_api_does(
    gateway: GatewayProcess, run_id: str, tab: Page
) -> None:
    panel = open_run(tab, gateway, run_id)
    ask(panel, PROMPT, MODELS, **{"Max new tokens": "24", "Temperature": "0"})
    panel.get_by_role("button", name="Generate").click()

    columns = panel.locator(".answer")
    expect(columns).to_have_count(len(MODELS))
    for name in MODELS:
        expect(panel.locator(f".answer[data-model='{name}']")).to_have_attribute(
            "data-state", "done", timeout=ANSWER_TIMEOUT_MS
        )
    expect(panel.locator("#try-status")).to_contain_text("Done in")
    expect(panel.get_by_role("button", name="Generate")).to_be_enabled()
    expect(panel.get_by_role("button", name="Stop", exact=True)).to_be_disabled()

    # the same request over REST: greedy decoding gives the same answers
    body = {"models": list(MODELS), "prompt": PROMPT, "maxNewTokens": 24, "temperature": 0}
    events = generate(gateway, run_id, body)
    done = {data["model"]: data for kind, data in events if kind == "done"}
    started = {data["model"]: data for kind, data in events if kind == "started"}
    assert sorted(done) == sorted(MODELS), events
    for name in MODELS:
        pieces = "".join(d["text"] for kind, d in events if kind == "token" and d["model"] == name)
        assert pieces == done[name]["text"]
        column = panel.locator(f".answer[data-model='{name}']")
        text = column.locator(".answer-text")
        assert text.evaluate("node => node.textContent") == done[name]["text"]
        assert done[name]["text"], "an empty answer proves nothing"
        expect(text).to_have_attribute("aria-live", "polite")
        expect(text).to_have_attribute("aria-busy", "false")
        expect(column.get_by_role("heading", name=name)).to_be_visible()
        figures = {
            key: column.locator(f"[data-figure='{key}'] dd")
            for key in ("ttft", "rate", "tokens", "finish", "device")
        }
        expect(figures["tokens"]).to_have_text(str(done[name]["completion_tokens"]))
        expect(figures["ttft"]).to_have_text(re.compile(r"^\d+(\.\d+)? s$"))
        expect(figures["rate"]).to_have_text(re.compile(r"^[\d,.]+ tok/s$"))
        reason = done[name]["finish_reason"]
        assert reason in ("length", "eos")
        words = {"length": "max new tokens", "eos": "end of text"}
        expect(figures["finish"]).to_have_text(words[reason])
        device = f"{started[name]['device']} · {started[name]['precision']}"
        assert device.startswith("cpu · ")
        expect(figures["device"]).to_have_text(device)
    OUTPUT.mkdir(exist_ok=True)
    tab.evaluate("window.scrollTo(0, 0)")  # else the sticky top bar lands mid-page
    tab.screenshot(path=str(OUTPUT / "try_it.png"), full_page=True, animations="disabled")


def test_stop_ends_a_long_generation_and_the_buttons_come_back(
    gateway: GatewayProcess, run_id: str, tab: Page
) -> None:
    panel = open_run(tab, gateway, run_id)
    generate_button = panel.get_by_role("button", name="Generate")
    stop = panel.get_by_role("button", name="Stop", exact=True)
    # as long as the models' 512 positions allow: the answer streams for a while
    ask(panel, PROMPT, MODELS, **{"Max new tokens": "480", "Temperature": "1"})
    generate_button.click()
    expect(generate_button).to_be_disabled()
    expect(stop).to_be_enabled()
    expect(stop).to_be_focused()  # the button pressed went away: the one that now acts has it
    streaming = panel.locator(".answer[data-state='streaming'] .answer-text")
    expect(streaming.first).not_to_be_empty(timeout=ANSWER_TIMEOUT_MS)
    stop.click()

    expect(panel.locator("#try-status")).to_have_text("Stopped.")
    expect(generate_button).to_be_enabled()
    expect(stop).to_be_disabled()
    expect(generate_button).to_be_focused()
    stopped = panel.locator(".answer[data-state='stopped']")
    expect(stopped.first).to_be_visible()
    # what had arrived stays on screen, shorter than what was asked for
    kept = stopped.first.locator(".answer-text").evaluate("node => node.textContent")
    assert kept
    expect(stopped.first.locator("[data-figure='finish'] dd")).to_have_text("stopped by you")
    expect(
        panel.locator(".answer[data-state='streaming'], .answer[data-state='waiting']")
    ).to_have_count(0)

    # the service let go of it: the next request, from the keyboard, is answered at once
    panel.get_by_label("Max new tokens", exact=True).fill("8")
    panel.get_by_label("Prompt").press("Control+Enter")
    for name in MODELS:
        expect(panel.locator(f".answer[data-model='{name}']")).to_have_attribute(
            "data-state", "done", timeout=ANSWER_TIMEOUT_MS
        )


def test_a_refusal_is_shown_beside_the_field_it_names(
    gateway: GatewayProcess, run_id: str, tab: Page
) -> None:
    panel = open_run(tab, gateway, run_id)
    ask(panel, PROMPT, MODELS[:1], Temperature="5")
    (kind, status, refusal), *_ = generate(
        gateway, run_id, {"models": list(MODELS[:1]), "prompt": PROMPT, "temperature": 5}
    )
    assert (kind, status, refusal["field"]) == ("refusal", 400, "temperature"), refusal

    panel.get_by_role("button", name="Generate").click()
    temperature = panel.get_by_label("Temperature", exact=True)
    error = panel.locator("#try-temperature-error")
    expect(error).to_have_text(refusal["message"])
    expect(error).to_contain_text("temperature")
    expect(temperature).to_have_attribute("aria-invalid", "true")
    expect(temperature).to_be_focused()
    expect(panel.locator(".answer")).to_have_count(0)
    expect(panel.get_by_role("button", name="Generate")).to_be_enabled()
    # typing in the field clears its error
    temperature.fill("0")
    expect(error).to_be_hidden()
    expect(temperature).not_to_have_attribute("aria-invalid", "true")

    # no model ticked: said before any request
    panel.get_by_role("checkbox", name=MODELS[0]).uncheck()
    panel.get_by_role("button", name="Generate").click()
    expect(panel.locator("#try-models-error")).to_have_text("Pick at least one model to answer.")
    expect(panel.locator(".answer")).to_have_count(0)


def test_a_model_downloads_as_an_export_that_verifies(
    gateway: GatewayProcess, run_id: str, tab: Page, tmp_path: Path
) -> None:
    import tarfile

    from services.core.verify import verify_export_folder

    panel = open_run(tab, gateway, run_id)
    downloads = panel.locator("#try-downloads")
    expect(downloads).to_be_visible()
    link = downloads.get_by_role("link", name=f"Download {MODELS[0]}, merged")
    with tab.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename == f"{run_id}-{MODELS[0]}-merged.tar"
    archive = tmp_path / download.suggested_filename
    download.save_as(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    folder = tmp_path / "out" / f"{run_id}-{MODELS[0]}-merged"
    assert (folder / "README.md").read_text().startswith("---\n")  # the model card
    report = verify_export_folder(folder)
    assert report.ok, report.problems
