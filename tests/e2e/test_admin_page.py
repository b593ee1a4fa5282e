"""The admin page in a real browser (Debian's chromium driven by Playwright) against the real
suite: training service, metrics service and gateway as processes on free loopback ports."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.api.codec import event_to_dict, now_timestamp
from services.api.run_state import RunState, fold
from services.core.verify import verify_run_folder
from services.training.run_folder import LOCK_FILE
from tests.e2e.browser import Problems, launched, require_chromium
from tests.metrics.sample_run import RUN_ID as SAMPLE_RUN_ID
from tests.metrics.sample_run import run_events, run_message, three_epochs
from tests.processes import GatewayProcess, ServiceProcess, workspace_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output"
TOKEN = "page-test-token"
MODELS = ("tiny-llama", "tiny-gpt2")
EPOCHS = 5  # long enough that the gateway restart below lands mid-run
STATIC = REPO / "gateway" / "static"
RUN_ID_RE = re.compile(r"^run-\d{8}-\d{6}(-\d+)?$")
ARTIFACTS = ("live_metrics.json", "training_results.json", "oneseek_dna.json", "ledger_proof.json")
RUN_TIMEOUT_MS = 240_000

require_chromium()

from playwright.sync_api import (  # noqa: E402 - only once chromium is known to be there
    Browser,
    Page,
    Route,
    expect,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("admin-page")
    return workspace_env(root, demo_models_dir, ONESEEK_ADMIN_TOKEN=TOKEN)


@pytest.fixture(scope="module")
def gateway(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
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


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched() as browser:
        yield browser


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, Problems]]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    # expected: the 4xx the test asks for, and refused connections while the gateway restarts
    problems = Problems(page, ("Failed to load resource", "WebSocket connection to"))
    yield page, problems
    context.close()
    assert problems.seen == []


def use_token(page: Page, token: str) -> None:
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Use token").click()


def test_token_and_field_errors_come_from_the_server(
    gateway: GatewayProcess, page: tuple[Page, Problems]
) -> None:
    tab, _ = page
    tab.goto(gateway.url + "/")
    expect(tab.locator("#health")).to_have_attribute("data-state", "ok")
    expect(tab.get_by_role("button", name="Start run")).to_be_disabled()
    # defaults come from /api/config, not from the page
    config = gateway.get("/api/config")
    expect(tab.get_by_label("Epochs", exact=True)).to_have_value(str(config["defaults"]["epochs"]))
    expect(tab.get_by_label("Epochs", exact=True)).to_have_attribute(
        "max", str(config["limits"]["max_epochs"])
    )

    use_token(tab, "not-the-token")
    expect(tab.locator("#token-error")).to_be_visible()
    expect(tab.get_by_role("button", name="Start run")).to_be_disabled()

    use_token(tab, TOKEN)
    runs_before = gateway.get("/api/training/runs")["runs"]
    for name in MODELS:
        tab.locator("#start-form").get_by_role("checkbox", name=name).check()
    tab.get_by_label("Dataset").select_option("small")
    epochs = tab.get_by_label("Epochs", exact=True)
    epochs.fill(str(config["limits"]["max_epochs"] + 1))
    tab.get_by_role("button", name="Start run").click()
    error = tab.locator("#epochs-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("epochs")
    expect(epochs).to_have_attribute("aria-invalid", "true")
    expect(epochs).to_be_focused()
    # nothing was started
    assert gateway.get("/api/training/runs")["runs"] == runs_before

    # the token survives a reload (sessionStorage), the models list comes back with it
    tab.reload()
    expect(tab.locator("#token-set")).to_be_visible()
    expect(tab.locator("#start-form").get_by_role("checkbox", name=MODELS[0])).to_be_visible()


def test_an_unknown_run_is_reported_and_not_retried(
    gateway: GatewayProcess, page: tuple[Page, Problems]
) -> None:
    tab, _ = page
    tab.goto(gateway.url + "/#run=run-20000101-000000")
    feed = tab.locator("#feed-status")
    expect(feed).to_have_attribute("data-state", "error")
    expect(tab.locator("#run-error")).to_contain_text("run-20000101-000000")
    tab.wait_for_timeout(2_000)  # longer than the first reconnect delay
    expect(feed).to_have_attribute("data-state", "error")


def board_names(tab: Page) -> list[str]:
    names: list[str] = tab.locator("#leaderboard .board-row").evaluate_all(
        "rows => rows.map(row => row.dataset.model)"
    )
    return names


def points(tab: Page, chart: str, model: str) -> int:
    return tab.locator(f"#{chart} .chart-series[data-model='{model}'] .chart-point").count()


def test_a_run_started_from_the_page_streams_live_to_the_end(
    gateway: GatewayProcess, page: tuple[Page, Problems]
) -> None:
    tab, _ = page
    tab.goto(gateway.url + "/")
    use_token(tab, TOKEN)
    for name in MODELS:
        tab.locator("#start-form").get_by_role("checkbox", name=name).check()
    tab.get_by_label("Dataset").select_option("small")
    tab.get_by_label("Epochs", exact=True).fill(str(EPOCHS))
    tab.get_by_role("button", name="Start run").click()

    title = tab.locator("#run-title")
    expect(title).to_have_text(RUN_ID_RE)
    run_id = title.inner_text()
    expect(tab.locator("#run-status")).to_have_text("Running")
    expect(tab.locator("#feed-status")).to_have_attribute("data-state", "live")
    expect(tab.get_by_role("button", name="Stop run")).to_be_visible()

    # the first epoch fills both rows and both charts
    rows = tab.locator("#leaderboard .board-row")
    expect(rows).to_have_count(len(MODELS))
    expect(tab.locator("#leaderboard .board-row[data-rank='1']")).to_have_count(
        1, timeout=RUN_TIMEOUT_MS
    )
    for name in MODELS:
        expect(tab.locator(f"#loss-chart .chart-series[data-model='{name}']")).to_have_count(1)
        expect(tab.locator(f"#weight-chart .chart-series[data-model='{name}']")).to_have_count(1)
    OUTPUT.mkdir(exist_ok=True)
    tab.screenshot(path=str(OUTPUT / "admin_page_running.png"), animations="disabled")

    # a gateway restart mid-run: the page says so, reconnects with `since`, loses nothing
    assert gateway.stop() == 0, gateway.output()
    feed = tab.locator("#feed-status")
    expect(feed).to_have_attribute("data-state", "reconnecting")
    expect(feed).to_contain_text("Disconnected")
    gateway.start()
    expect(feed).to_have_attribute("data-state", re.compile("live|finished"), timeout=30_000)

    status = tab.locator("#run-status")
    expect(status).to_have_text(re.compile("Completed|Auto-stopped"), timeout=RUN_TIMEOUT_MS)
    expect(feed).to_have_attribute("data-state", "finished")

    metrics = gateway.get(f"/api/training/{run_id}/metrics")
    history = metrics["training_history"]
    epochs_run = len(history)
    assert epochs_run >= 1
    final = metrics["val_losses"]
    assert sorted(final) == sorted(MODELS)

    expect(tab.locator("#epoch-value")).to_have_text(f"{epochs_run}/{EPOCHS}")
    expect(tab.locator("#progress-text")).to_have_text("100.0%")
    expect(tab.locator("#auto-stop-value")).to_have_text(
        "Triggered" if metrics["auto_stop_info"]["triggered"] else "Not triggered"
    )

    # leaderboard: sorted by the final validation loss, numbers as the service has them
    ranking = sorted(MODELS, key=lambda name: (final[name], name))
    assert board_names(tab) == ranking
    for rank, name in enumerate(ranking, start=1):
        row = tab.locator(f"#leaderboard .board-row[data-model='{name}']")
        expect(row.locator(".rank-badge")).to_have_text(str(rank))
        expect(row.locator(".loss-value")).to_have_text(f"{final[name]:.4f}")
        expect(row.locator(".weight-value")).to_have_text(f"×{metrics['weights'][name]:.3f}")
        # where the memory plan put it, as GET …/metrics says
        (placed,) = [p for p in metrics["placement"] if p["model"] == name]
        expect(row.locator(".device-name")).to_have_text(placed["device"])
        mib = placed["estimated_bytes"] / 1024**2
        expect(row.locator(".device-need")).to_have_text(f"~{mib:.1f} MiB {placed['precision']}")
    expect(
        tab.locator(f"#leaderboard .board-row[data-model='{ranking[0]}'] .tag-best")
    ).to_be_visible()

    # charts: one point per finished epoch (weights also show the start, epoch 0)
    for name in MODELS:
        assert points(tab, "loss-chart", name) == epochs_run
        assert points(tab, "weight-chart", name) == epochs_run + 1
    expect(tab.locator("#loss-legend")).to_contain_text(f"{final[ranking[0]]:.4f}")

    # history: the run, its best model and DNA, and its four files
    row = tab.locator(f"#history-body tr[data-run-id='{run_id}']")
    expect(row).to_contain_text("Completed", timeout=30_000)
    expect(row.locator(".best-cell")).to_have_text(ranking[0])
    summary = next(r for r in gateway.get("/api/training/runs")["runs"] if r["run_id"] == run_id)
    assert summary["dna"]
    expect(row.locator(".dna")).to_have_attribute("title", summary["dna"])
    links = row.locator("a.artifact-link")
    expect(links).to_have_count(len(ARTIFACTS))
    for link, name in zip(links.all(), ARTIFACTS, strict=True):
        href = link.get_attribute("href")
        assert href == f"/api/training/{run_id}/artifacts/{name}"
        assert isinstance(gateway.get(href), dict)
    row.get_by_role("link", name="DNA").click()
    dialog = tab.locator("#artifact-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#artifact-body")).to_contain_text(summary["dna"])
    tab.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    tab.evaluate("window.scrollTo(0, 0)")
    tab.screenshot(path=str(OUTPUT / "admin_page.png"), animations="disabled")
    tab.screenshot(path=str(OUTPUT / "admin_page_full.png"), full_page=True, animations="disabled")

    # a fresh page shows the finished run from its initial_state alone, charts included
    final_status = status.inner_text()
    tab.set_viewport_size({"width": 390, "height": 844})
    tab.reload()
    expect(tab.locator("#run-title")).to_have_text(run_id)
    expect(status).to_have_text(final_status)
    expect(rows).to_have_count(len(MODELS))
    assert board_names(tab) == ranking
    for name in MODELS:
        expect(
            tab.locator(f"#loss-chart .chart-series[data-model='{name}'] .chart-point")
        ).to_have_count(epochs_run)
    tab.screenshot(path=str(OUTPUT / "admin_page_phone.png"), animations="disabled")
    tab.screenshot(
        path=str(OUTPUT / "admin_page_phone_full.png"), full_page=True, animations="disabled"
    )


def start_from_the_page(tab: Page, gateway: GatewayProcess, epochs: int) -> str:
    """Starts a run of one model from the form; its run id once the page shows it running."""
    tab.goto(gateway.url + "/")
    use_token(tab, TOKEN)
    tab.locator("#start-form").get_by_role("checkbox", name=MODELS[0]).check()
    tab.get_by_label("Dataset").select_option("small")
    tab.get_by_label("Epochs", exact=True).fill(str(epochs))
    # the previous test's worker may still be shutting down: a 409 is shown, then a retry works
    start = tab.get_by_role("button", name="Start run")
    status = tab.locator("#run-status")
    deadline = time.monotonic() + 60
    while True:
        start.click()
        try:
            expect(status).to_have_text("Running", timeout=5_000)
            break
        except AssertionError:
            assert time.monotonic() < deadline, tab.locator("#form-error").inner_text()
    expect(tab.locator("#feed-status")).to_have_attribute("data-state", "live")
    return tab.locator("#run-title").inner_text()


def test_a_run_whose_worker_died_is_resumed_from_the_page(
    gateway: GatewayProcess, page: tuple[Page, Problems]
) -> None:
    tab, problems = page
    run_id = start_from_the_page(tab, gateway, epochs=3)
    status, resume = tab.locator("#run-status"), tab.locator("#resume-button")
    expect(resume).to_be_hidden()
    # after the first epoch's checkpoint, the worker dies as an out-of-memory kill would
    folder = Path(gateway.env["MODELS_DIR"]) / "oneseek-certified" / run_id
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while not list((folder / "checkpoints").glob("epoch-*")):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)
    os.kill(int((folder / LOCK_FILE).read_text().strip()), signal.SIGKILL)
    expect(status).to_have_text("Failed", timeout=60_000)
    expect(resume).to_be_visible()

    resume.click()
    expect(status).to_have_text("Completed", timeout=RUN_TIMEOUT_MS)
    expect(resume).to_be_hidden()
    expect(tab.locator("#epoch-value")).to_have_text("3/3")
    expect(tab.locator("#loss-chart .chart-series .chart-point")).to_have_count(3)
    row = tab.locator(f"#history-body tr[data-run-id='{run_id}']")
    expect(row).to_contain_text("Completed", timeout=30_000)
    assert verify_run_folder(folder).ok
    history = gateway.get(f"/api/training/{run_id}/metrics")["training_history"]
    assert [epoch["epoch"] for epoch in history] == [1, 2, 3]
    assert not problems.seen, problems.seen


def test_stop_asks_for_confirmation_then_ends_the_run(
    gateway: GatewayProcess, page: tuple[Page, Problems]
) -> None:
    tab, _ = page
    run_id = start_from_the_page(tab, gateway, config_max_epochs(gateway))
    status = tab.locator("#run-status")
    stop = tab.locator("#stop-button")
    stop.click()
    expect(stop).to_have_text("Confirm stop")
    assert gateway.get(f"/api/training/{run_id}/metrics")["status"] == "running"
    stop.click()
    expect(status).to_have_text("Stopped", timeout=RUN_TIMEOUT_MS)
    expect(stop).to_be_hidden()
    expect(tab.locator("#run-summary")).to_contain_text("Stopped")
    row = tab.locator(f"#history-body tr[data-run-id='{run_id}']")
    expect(row).to_contain_text("Stopped", timeout=30_000)
    assert gateway.get(f"/api/training/{run_id}/metrics")["status"] == "stopped"


def config_max_epochs(gateway: GatewayProcess) -> int:
    return int(gateway.get("/api/config")["limits"]["max_epochs"])


# --- the page's own state fold, against the metrics service's snapshots ------------------------

REPLAY_CHECK = """
async ({events, snapshots}) => {
  const m = await import("/static/run_state.js");
  const view = (run) => JSON.stringify({
    rows: m.leaderboardRows(run).map((r) => [r.name, r.rank, r.loss, r.weight, r.lr]),
    loss: m.lossSeries(run), weight: m.weightSeries(run), status: run.status,
    epoch: m.displayEpoch(run), total: run.totalLoss, auto: run.autoStopInfo,
    percent: run.progressPercent, lastSeq: run.lastSeq, best: m.bestModel(run),
  });
  // the page that never blinked: the first snapshot, then every event once
  const clean = m.createRun(snapshots[0].run_id);
  m.applyEvent(clean, snapshots[0]);
  const expected = [view(clean)];
  for (const event of events) { m.applyEvent(clean, event); expected.push(view(clean)); }
  const problems = [];
  // a page that saw events up to `since`, lost its connection, and got every event after
  // `since` again, with `overlap` events it already had sent twice
  for (let since = 0; since <= events.length; since += 1) {
    for (let overlap = 0; overlap <= since; overlap += 1) {
      const run = m.createRun(snapshots[0].run_id);
      m.applyEvent(run, snapshots[0]);
      for (const event of events.slice(0, since)) m.applyEvent(run, event);
      for (const event of events.slice(since - overlap)) {
        m.applyEvent(run, event);
        if (view(run) !== expected[Math.max(since, event.seq)]) {
          problems.push(`seq ${event.seq} again after ${since}`);
        }
      }
    }
  }
  // the same, with a snapshot at seq `at` (>= since) first, as a server that starts every
  // connection with initial_state would send
  for (let since = 0; since <= events.length; since += 1) {
    for (let at = since; at <= events.length; at += 1) {
      const run = m.createRun(snapshots[0].run_id);
      m.applyEvent(run, snapshots[0]);
      for (const event of events.slice(0, since)) m.applyEvent(run, event);
      m.applyEvent(run, snapshots[at]);
      if (view(run) !== expected[at]) problems.push(`snapshot ${at} after ${since}`);
      for (const event of events.slice(since)) {
        m.applyEvent(run, event);
        const seen = Math.max(at, event.seq);
        if (view(run) !== expected[seen]) problems.push(`seq ${event.seq}, ${since}->${at}`);
      }
    }
  }
  return {problems: problems.slice(0, 10), count: problems.length, final: expected.at(-1)};
}
"""


def serve_static(route: Route) -> None:
    """The page's modules from disk, under the gateway's strict policy, with no server."""
    path = route.request.url.split("://", 1)[1].split("/", 1)[1].split("?")[0]
    headers = {"Content-Security-Policy": "default-src 'self'; script-src 'self'"}
    if path.startswith("static/") and (STATIC / path.removeprefix("static/")).is_file():
        file = STATIC / path.removeprefix("static/")
        kind = "text/javascript" if file.suffix == ".js" else "text/plain"
        route.fulfill(body=file.read_bytes(), content_type=kind, headers=headers)
    else:
        route.fulfill(body="<!doctype html><title>fold</title>", content_type="text/html")


def test_the_page_state_is_the_same_whatever_point_it_reconnects_at(browser: Browser) -> None:
    run = run_message()
    events = [event_to_dict(event) for event in run_events(three_epochs(), progress_per_model=2)]
    # initial_state after each prefix of the run, exactly as the metrics service builds it
    snapshots = []
    for count in range(len(events) + 1):
        state = RunState(SAMPLE_RUN_ID, config=run.config, models=run.models)
        fold(state, events[:count])
        snapshots.append(event_to_dict(state.initial_state(now_timestamp())))
    assert [s["seq"] for s in snapshots] == list(range(len(events) + 1))

    context = browser.new_context()
    try:
        context.route("http://fold.test/**", serve_static)
        tab = context.new_page()
        tab.goto("http://fold.test/")
        result = tab.evaluate(REPLAY_CHECK, {"events": events, "snapshots": snapshots})
    finally:
        context.close()
    assert result["count"] == 0, result["problems"]
    final = json.loads(result["final"])
    # the end state is the run's: ranked by the last epoch, every epoch charted
    last = three_epochs()[-1]
    assert [row[0] for row in final["rows"]] == sorted(last, key=lambda name: (last[name], name))
    assert [row[2] for row in final["rows"]] == sorted(last.values())
    assert final["status"] == "completed" and final["percent"] == 100
    assert all(len(series["points"]) == 3 for series in final["loss"])
