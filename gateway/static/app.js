// The admin page: wires the form, the live feed, the leaderboard, the charts and the history.
// Every default comes from /api/config; every number on screen comes from an event, rounded
// only when it is drawn.

import { ApiError, api, getToken, setToken } from "./api.js";
import { LineChart, colorFor } from "./charts.js";
import { RunFeed } from "./feed.js";
import { TrainingForm } from "./form.js";
import {
  DASH,
  formatDateTime,
  formatDuration,
  formatLoss,
  formatPercent,
  formatRate,
  isNumber,
  statusLabel,
} from "./format.js";
import { artifactLinks, renderHistory } from "./history.js";
import { renderLeaderboard } from "./leaderboard.js";
import {
  applyEvent,
  bestModel,
  createRun,
  displayEpoch,
  isFinished,
  leaderboardRows,
  lossSeries,
  weightSeries,
} from "./run_state.js";
import { TryItPanel } from "./try_it.js";

const HISTORY_POLL_MS = 10000;
const HEALTH_POLL_MS = 15000;
const HISTORY_PAGE = 20;

const $ = (selector) => document.querySelector(selector);

const page = {
  config: null,
  run: null, // run_state of the run on screen
  feed: null,
  runs: [], // history, newest first
  historyLimit: HISTORY_PAGE,
  userChoseRun: false, // once a person picks a run, a new active run does not take over
  renderQueued: false,
  chartsDirty: false,
  feedStatus: { state: "idle" },
  stopArmed: null,
  catalogLoaded: false,
};

// --- small helpers ---------------------------------------------------------------------------

function announce(message) {
  const region = $("#announcer");
  region.textContent = "";
  // a new text node after a tick, so the same sentence twice is still read out
  window.setTimeout(() => {
    region.textContent = message;
  }, 50);
}

function hashParams() {
  return new URLSearchParams(window.location.hash.replace(/^#/, ""));
}

function writeHash(runId) {
  const params = hashParams();
  params.delete("token");
  if (runId) params.set("run", runId);
  const hash = params.toString();
  const url = `${window.location.pathname}${window.location.search}${hash ? `#${hash}` : ""}`;
  window.history.replaceState(null, "", url);
}

function summaryFor(runId) {
  return page.runs.find((run) => run.run_id === runId) ?? null;
}

/** [min, max] weight: the run's own config (what it was started with), else the server's;
 * null before either is known. */
function weightRange() {
  const own = page.run?.config?.adaptive_weights;
  const server = page.config?.adaptive_weights;
  const min = own?.min_multiplier ?? server?.min_multiplier;
  const max = own?.max_multiplier ?? server?.max_multiplier;
  return isNumber(min) && isNumber(max) && max > min ? [min, max] : null;
}

function colorOf(name) {
  const index = page.run ? page.run.names.indexOf(name) : -1;
  return colorFor(Math.max(0, index));
}

// --- token and catalog -----------------------------------------------------------------------

const form = new TrainingForm($("#start-form"), { onSubmit: startRun });

function showTokenState() {
  const has = Boolean(getToken());
  $("#token-form").hidden = has;
  $("#token-set").hidden = !has;
  renderStopButton();
  renderResumeButton();
  renderTryIt();
}

function showTokenError(message) {
  const error = $("#token-error");
  error.textContent = message;
  error.hidden = !message;
  if (message) $("#token-input").setAttribute("aria-invalid", "true");
  else $("#token-input").removeAttribute("aria-invalid");
}

async function loadCatalog() {
  page.catalogLoaded = false;
  if (!getToken()) {
    form.showLocked("Enter the admin token above to list the base models and datasets.");
    return;
  }
  try {
    const [models, datasets] = await Promise.all([api.models(), api.datasets()]);
    form.setCatalog({ models: models?.models ?? [], datasets: datasets?.datasets ?? [] });
    page.catalogLoaded = true;
    showTokenError("");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      setToken("");
      showTokenState();
      showTokenError(error.message);
      form.showLocked("The token was refused. Enter the right one above.");
      $("#token-input").focus();
    } else {
      form.showLocked(`Models and datasets could not be listed: ${error.message}`);
    }
  }
}

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("#token-input").value.trim();
  if (!token) {
    showTokenError("Enter the admin token: `oneseek up` prints it in the page's URL.");
    return;
  }
  setToken(token);
  $("#token-input").value = "";
  showTokenState();
  loadCatalog();
});

$("#token-forget").addEventListener("click", () => {
  setToken("");
  showTokenState();
  form.showLocked("Enter the admin token above to list the base models and datasets.");
  $("#token-input").focus();
});

// --- starting and stopping -------------------------------------------------------------------

async function startRun(body) {
  const answer = await api.start(body);
  announce(`Run ${answer.runId} started.`);
  page.userChoseRun = false;
  selectRun(answer.runId);
  refreshHistory();
  showRunPanel();
}

/** Bring the live run into view (the Start button may be far below it) and give it focus. */
function showRunPanel() {
  const panel = $("#run-panel");
  const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  panel.scrollIntoView({ behavior: smooth ? "smooth" : "auto", block: "start" });
  panel.focus({ preventScroll: true });
}

function renderStopButton() {
  const button = $("#stop-button");
  const running = page.run?.status === "running";
  if (!running) button.classList.remove("is-busy");
  button.hidden = !running;
  button.disabled = !getToken() || button.classList.contains("is-busy");
  button.title = getToken() ? "" : "Enter the admin token to stop runs";
  if (!running) disarmStop();
}

function disarmStop() {
  window.clearTimeout(page.stopArmed);
  page.stopArmed = null;
  const button = $("#stop-button");
  button.classList.remove("is-armed");
  if (!button.classList.contains("is-busy")) button.textContent = "Stop run";
}

$("#stop-button").addEventListener("click", async () => {
  const button = $("#stop-button");
  const run = page.run;
  if (!run || button.classList.contains("is-busy")) return;
  if (!page.stopArmed) {
    // two steps: a stop cannot be undone
    button.classList.add("is-armed");
    button.textContent = "Confirm stop";
    page.stopArmed = window.setTimeout(disarmStop, 4000);
    return;
  }
  disarmStop();
  button.classList.add("is-busy");
  button.textContent = "Stopping…";
  button.disabled = true;
  try {
    await api.stop(run.runId);
    announce(
      `Stop requested for ${run.runId}. The current step finishes, then artifacts are written.`,
    );
  } catch (error) {
    showRunError(error.message);
    button.classList.remove("is-busy");
    button.textContent = "Stop run";
  }
  renderStopButton();
  renderResumeButton();
});

// an interrupted run, or one whose worker died, continues from its last completed epoch
const RESUMABLE = new Set(["interrupted", "failed"]);

function renderResumeButton() {
  const button = $("#resume-button");
  const resumable = RESUMABLE.has(page.run?.status);
  if (!resumable) button.classList.remove("is-busy");
  button.hidden = !resumable;
  button.disabled = !getToken() || button.classList.contains("is-busy");
  button.title = getToken() ? "" : "Enter the admin token to resume runs";
}

$("#resume-button").addEventListener("click", async () => {
  const button = $("#resume-button");
  const run = page.run;
  if (!run || button.classList.contains("is-busy")) return;
  button.classList.add("is-busy");
  button.textContent = "Resuming…";
  button.disabled = true;
  try {
    await api.resume(run.runId);
    // the feed stays open on a resumable run: its next epoch_start shows it running again
    announce(`${run.runId} resumed from its last completed epoch.`);
    refreshHistory();
  } catch (error) {
    showRunError(error.message);
  } finally {
    button.classList.remove("is-busy");
    button.textContent = "Resume run";
    renderResumeButton();
  }
});

// --- the run on screen -----------------------------------------------------------------------

const lossChart = new LineChart($("#loss-chart"), $("#loss-legend"), {
  title: "Validation loss per model per epoch",
  xLabel: "Epoch",
  yFormat: formatLoss,
  tickFormat: (value) => String(Number(value.toPrecision(4))),
});

const weightChart = new LineChart($("#weight-chart"), $("#weight-legend"), {
  title: "Adaptive weight per model per epoch",
  xLabel: "Epoch (0 = start)",
  xStart: 0,
  reference: 1,
  yFormat: (value) => `×${value.toFixed(3)}`,
  tickFormat: (value) => `×${Number(value.toPrecision(3))}`,
  domain: (values) => {
    const range = weightRange() ?? [Math.min(1, ...values), Math.max(1, ...values)];
    const pad = (range[1] - range[0]) * 0.05 || 0.05;
    return [range[0] - pad, range[1] + pad];
  },
});

const tryIt = new TryItPanel($("#try-panel"), {
  colorOf,
  announce,
  askForToken: () => {
    const input = $("#token-input");
    const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    input.scrollIntoView({ behavior: smooth ? "smooth" : "auto", block: "center" });
    input.focus({ preventScroll: true });
  },
});

/** The "Try it" panel follows the run on screen: shown once it finished with models to load. */
function renderTryIt() {
  const run = page.run;
  if (!run) {
    tryIt.show(null, { hasToken: false });
    return;
  }
  const info = new Map(run.models.map((model) => [model.name, model]));
  tryIt.show(
    {
      runId: run.runId,
      status: run.status,
      models: run.names.map((name) => info.get(name) ?? { name }),
      // the run's own word first; a page opened later has it from the history
      best: run.bestModel ?? summaryFor(run.runId)?.best_model ?? bestModel(run),
    },
    { hasToken: Boolean(getToken()) },
  );
}

function selectRun(runId, { user = false } = {}) {
  if (user) page.userChoseRun = true;
  if (page.run?.runId === runId && page.feed) return;
  page.feed?.close("idle");
  page.run = createRun(runId);
  page.chartsDirty = true;
  $("#leaderboard").replaceChildren();
  writeHash(runId);
  showRunError("");
  page.feed = new RunFeed(runId, {
    lastSeq: () =>
      page.run?.runId === runId && page.run.snapshotSeq !== null ? page.run.lastSeq : null,
    onMessage: (event) => receive(runId, event),
    onStatus: (status) => {
      if (page.run?.runId !== runId) return;
      page.feedStatus = status;
      renderFeedStatus();
      if (status.state === "error") showRunError(status.message);
    },
  }).start();
  renderAll();
  renderHistoryTable();
}

function receive(runId, event) {
  const run = page.run;
  if (!run || run.runId !== runId) return;
  const wasFinished = isFinished(run);
  const previousEpochs = run.history.length;
  const kind = applyEvent(run, event, Date.now());
  if (kind === null) return;
  if (kind !== "progress") page.chartsDirty = true;
  if (kind === "epoch_end" && run.history.length > previousEpochs) {
    const [leader] = leaderboardRows(run);
    if (leader?.rank === 1) {
      announce(
        `Epoch ${event.epoch} finished. ${leader.name} leads with ${formatLoss(leader.loss)}.`,
      );
    }
  }
  if (isFinished(run)) {
    if (!wasFinished && kind !== "initial_state") {
      announce(`${run.runId} ${statusLabel(run.status).toLowerCase()}.`);
    }
    // nothing more will come, unless the run can be resumed (from here or anywhere else):
    // stop listening to a run that ended for good, and let the history show the final state
    if (!RESUMABLE.has(run.status)) page.feed?.close("finished");
    refreshHistory();
  }
  queueRender();
}

function queueRender() {
  if (page.renderQueued) return;
  page.renderQueued = true;
  window.requestAnimationFrame(() => {
    page.renderQueued = false;
    renderAll();
  });
}

function showRunError(message) {
  const box = $("#run-error");
  box.textContent = message || "";
  box.hidden = !message;
}

function renderFeedStatus() {
  const indicator = $("#feed-status");
  const { state, retryAt } = page.feedStatus;
  let text;
  let retry = "";
  switch (state) {
    case "connecting":
      text = "Connecting…";
      break;
    case "live":
      text = "Live";
      break;
    case "reconnecting": {
      // the countdown stays out of the live region: it would be read out every second
      text = "Disconnected";
      const seconds = retryAt ? Math.max(0, Math.ceil((retryAt - Date.now()) / 1000)) : 0;
      retry = seconds > 0 ? `· retrying in ${seconds}s` : "· reconnecting…";
      break;
    }
    case "finished":
      text = "Run finished";
      break;
    case "error":
      text = "Disconnected";
      break;
    default:
      text = "Not connected";
  }
  indicator.dataset.state = state;
  const label = indicator.querySelector(".feed-text");
  if (label.textContent !== text) label.textContent = text;
  indicator.querySelector(".feed-retry").textContent = retry;
}

function renderHeader(run) {
  const summary = summaryFor(run.runId);
  $("#run-title").textContent = run.runId;
  const status = run.status ?? summary?.status;
  const badge = $("#run-status");
  badge.hidden = !status;
  badge.className = `status-badge status-${status || "unknown"}`;
  badge.textContent = statusLabel(status);
  const parts = [];
  const dataset = run.config?.dataset_id ?? summary?.dataset_id;
  if (dataset) parts.push(`Dataset ${dataset}`);
  if (run.names.length) parts.push(`${run.names.length} model${run.names.length === 1 ? "" : "s"}`);
  if (run.config) {
    parts.push(
      `${run.config.method === "full" ? "full fine-tune" : `LoRA r${run.config.lora_rank}`}`,
    );
    parts.push(`lr ${run.config.learning_rate}`);
  }
  if (summary?.started_at) parts.push(`started ${formatDateTime(summary.started_at)}`);
  $("#run-meta").textContent = parts.join(" · ");
}

function renderSummary(run) {
  const box = $("#run-summary");
  if (!isFinished(run) && run.status !== "interrupted") {
    box.hidden = true;
    return;
  }
  const summary = summaryFor(run.runId);
  const best = bestModel(run) ?? summary?.best_model;
  const dna = run.dna ?? summary?.dna;
  box.hidden = false;
  box.dataset.status = run.status;
  const took = runDuration(run);
  let title = `${statusLabel(run.status)}${isNumber(took) ? ` in ${formatDuration(took)}` : ""}`;
  if (run.status === "failed") title = "Run failed";
  if (run.status === "interrupted") title = "Run interrupted: the service stopped while it ran";
  $("#summary-title").textContent = title;
  $("#summary-best").textContent = best ? `Best model ${best}` : "";
  const dnaText = $("#summary-dna");
  dnaText.hidden = !dna;
  dnaText.textContent = dna ? `DNA ${dna}` : "";
  dnaText.title = dna ?? "";
  const files = $("#summary-files");
  if (run.status !== "failed" && files.dataset.runId !== run.runId) {
    files.replaceChildren(artifactLinks(run.runId, "artifact-links artifact-links-inline"));
    files.dataset.runId = run.runId;
  } else if (run.status === "failed") {
    files.replaceChildren();
    delete files.dataset.runId;
  }
}

function etaSeconds(run) {
  const progress = run.progress;
  if (!progress || !isNumber(progress.eta_seconds)) return null;
  const elapsed = (Date.now() - progress.receivedAt) / 1000;
  return Math.max(0, progress.eta_seconds - elapsed);
}

/** Seconds the run took, as its training_complete said (a page opened later does not know). */
function runDuration(run) {
  return isNumber(run.durationSeconds) ? run.durationSeconds : null;
}

function renderProgress(run) {
  const total = run.totalEpochs || run.config?.epochs || 0;
  $("#epoch-value").textContent = total ? `${displayEpoch(run)}/${total}` : DASH;
  const finished = isFinished(run);
  $("#epoch-detail").textContent =
    run.status === "running"
      ? run.currentEpoch
        ? `${run.currentEpoch} finished`
        : "first epoch running"
      : finished && run.currentEpoch < total
        ? `stopped early after ${run.epochsRun ?? run.currentEpoch}`
        : "";
  const percent = Math.max(0, Math.min(100, run.progressPercent ?? 0));
  $("#progress-text").textContent = formatPercent(percent);
  const bar = $("#progress-bar");
  bar.setAttribute("aria-valuenow", String(Number(percent.toFixed(1))));
  bar.style.setProperty("--progress", String(percent / 100));
  bar.dataset.state = run.status ?? "idle";
  const progress = run.status === "running" ? run.progress : null;
  const eta = run.status === "running" ? etaSeconds(run) : null;
  const took = finished ? runDuration(run) : null;
  $("#eta-text").textContent =
    run.status === "running"
      ? `ETA ${eta === null ? DASH : formatDuration(eta)}`
      : isNumber(took)
        ? `Took ${formatDuration(took)}`
        : "";
  $("#rate-text").textContent = progress ? formatRate(progress.tokens_per_second) : "— tok/s";
  $("#rate-text").hidden = run.status !== "running";
  $("#rate-text").title = progress ? `${progress.tokens_per_second} tokens per second` : "";
  $("#step-text").textContent = progress
    ? `${progress.model} · step ${progress.step}/${progress.total_steps}`
    : "";
}

/** The tab's title follows the run, for a page left open in the background. */
function renderTitle(run) {
  const total = run.totalEpochs || run.config?.epochs || 0;
  const where = run.status === "running" && total ? `${displayEpoch(run)}/${total} · ` : "";
  const status = run.status ? `${statusLabel(run.status)} · ` : "";
  document.title = `${where}${status}${run.runId} · OneSeek`;
}

function renderAutoStop(run) {
  const box = $("#auto-stop");
  const value = $("#auto-stop-value");
  const detail = $("#auto-stop-detail");
  const config = run.config?.auto_stop;
  const info = run.autoStopInfo;
  if (config && config.enabled === false) {
    box.dataset.state = "off";
    value.textContent = "Off";
    detail.textContent = "disabled for this run";
    return;
  }
  if (!info) {
    box.dataset.state = "idle";
    value.textContent = config ? `${config.patience} epochs remaining` : DASH;
    detail.textContent = config ? `threshold ${config.threshold}` : "";
    return;
  }
  if (!info.triggered && isFinished(run)) {
    box.dataset.state = "idle";
    value.textContent = "Not triggered";
    const ending = {
      completed: "ran every planned epoch",
      stopped: "stopped by hand",
      failed: "the run failed",
    };
    detail.textContent = `${ending[run.status] ?? "the run ended"} · threshold ${info.threshold}`;
    return;
  }
  if (info.triggered) {
    box.dataset.state = "triggered";
    value.textContent = "Triggered";
    detail.textContent = `plateau for ${info.streak} epochs (Δ < ${info.threshold})`;
    return;
  }
  box.dataset.state = "watching";
  const remaining = Math.max(0, info.remaining ?? 0);
  value.textContent = `${remaining} epoch${remaining === 1 ? "" : "s"} remaining`;
  const change = isNumber(info.current_change)
    ? `Δ ${Number(info.current_change.toPrecision(3))}`
    : "Δ from epoch 2";
  const streak = `streak ${info.streak}/${info.patience}`;
  detail.textContent = `${change} · threshold ${info.threshold} · ${streak}`;
  detail.title = isNumber(info.current_change) ? `current change ${info.current_change}` : "";
}

function renderBoard(run) {
  const rows = leaderboardRows(run);
  const weights = rows.map((row) => row.weight).filter(isNumber);
  const [min, max] = weightRange() ?? [Math.min(1, ...weights), Math.max(1, ...weights)];
  const climbed = renderLeaderboard($("#leaderboard"), rows, {
    colorOf,
    minWeight: min,
    maxWeight: max,
    trainingModel: run.status === "running" ? run.progress?.model : null,
    bestModel: isFinished(run) ? (bestModel(run) ?? summaryFor(run.runId)?.best_model) : null,
  });
  if (climbed.length && run.status === "running") {
    const row = rows.find((r) => r.name === climbed[0]);
    if (row) announce(`${row.name} moved up to rank ${row.rank}.`);
  }
  $("#board-empty").hidden = rows.length > 0;
  $("#board-empty").textContent = "Waiting for the run's first events…";
}

function renderCharts(run) {
  if (!page.chartsDirty) return;
  page.chartsDirty = false;
  const total = Math.max(run.totalEpochs || 0, run.history.at(-1)?.epoch ?? 0, 1);
  const withColors = (series) => series.map((s) => ({ ...s, color: colorOf(s.name) }));
  lossChart.update(withColors(lossSeries(run)), total);
  weightChart.update(withColors(weightSeries(run)), total);
}

function renderAll() {
  const run = page.run;
  $("#run-stats").hidden = !run;
  if (!run) {
    $("#board-empty").hidden = false;
    renderTryIt();
    renderFeedStatus();
    lossChart.update([], 1);
    weightChart.update([], 1);
    return;
  }
  renderHeader(run);
  renderSummary(run);
  renderProgress(run);
  renderTitle(run);
  renderAutoStop(run);
  renderBoard(run);
  renderCharts(run);
  renderStopButton();
  renderResumeButton();
  renderTryIt();
  renderFeedStatus();
  if (run.error) showRunError(run.error);
}

// one timer for what moves without events: the ETA countdown and the retry countdown
window.setInterval(() => {
  if (page.run?.status === "running" && page.run.progress) renderProgress(page.run);
  if (page.feedStatus.state === "reconnecting") renderFeedStatus();
}, 1000);

// --- history ---------------------------------------------------------------------------------

function renderHistoryTable() {
  const body = $("#history-body");
  renderHistory(body, page.runs, {
    selectedRunId: page.run?.runId ?? null,
    limit: page.historyLimit,
    onSelect: (runId) => {
      selectRun(runId, { user: true });
      showRunPanel();
    },
  });
  $("#history-empty").hidden = page.runs.length > 0;
  const more = $("#history-more");
  const hidden = page.runs.length - page.historyLimit;
  more.hidden = hidden <= 0;
  more.textContent = `Show ${hidden} older run${hidden === 1 ? "" : "s"}`;
}

$("#history-more").addEventListener("click", () => {
  page.historyLimit = Infinity;
  renderHistoryTable();
});

let historyRequest = null;

async function refreshHistory() {
  if (historyRequest) return historyRequest;
  historyRequest = (async () => {
    try {
      const answer = await api.runs();
      page.runs = answer?.runs ?? [];
      $("#history-error").hidden = true;
      renderHistoryTable();
      followActiveRun();
      if (page.run) {
        renderHeader(page.run);
        renderSummary(page.run);
        renderTryIt();
      }
    } catch (error) {
      const box = $("#history-error");
      box.textContent = `The run history could not be loaded: ${error.message}`;
      box.hidden = false;
    } finally {
      historyRequest = null;
    }
  })();
  return historyRequest;
}

/** Until someone picks a run, the page shows the running one, else the newest. */
function followActiveRun() {
  if (page.userChoseRun) return;
  const running = page.runs.find((run) => run.status === "running");
  const target = running ?? (page.run ? null : page.runs[0]);
  if (target && target.run_id !== page.run?.runId) selectRun(target.run_id);
}

$("#history-refresh").addEventListener("click", () => refreshHistory());

// --- artifact viewer -------------------------------------------------------------------------

document.addEventListener("click", async (event) => {
  const link = event.target.closest?.("a.artifact-link");
  if (!link) return;
  // a new tab, a download or a copied link: the browser's own way
  if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey)
    return;
  event.preventDefault();
  const dialog = $("#artifact-dialog");
  const body = $("#artifact-body");
  $("#artifact-title").textContent = `${link.dataset.runId} / ${link.dataset.artifact}`;
  $("#artifact-raw").href = link.href;
  body.textContent = "Loading…";
  if (!dialog.open) dialog.showModal();
  try {
    const data = await api.artifact(link.dataset.runId, link.dataset.artifact);
    body.textContent = JSON.stringify(data, null, 2);
  } catch (error) {
    body.textContent = error.message;
  }
});

$("#artifact-close").addEventListener("click", () => $("#artifact-dialog").close());
$("#artifact-dialog").addEventListener("click", (event) => {
  // a click on the backdrop (the dialog element itself, outside its content) closes it
  if (event.target === event.currentTarget) event.currentTarget.close();
});

// --- service health --------------------------------------------------------------------------

async function refreshHealth() {
  const pill = $("#health");
  const text = pill.querySelector(".health-text");
  try {
    const health = await api.health();
    if (health?.status === "ok") {
      pill.dataset.state = "ok";
      text.textContent = "Services up";
      // the lists failed while a service was down: fetch them again now that it is back
      if (page.config && getToken() && !page.catalogLoaded) loadCatalog();
    } else {
      const down = ["training", "metrics"].filter((name) => health?.[name] === false);
      pill.dataset.state = "degraded";
      const names = down.map((name) => `${name[0].toUpperCase()}${name.slice(1)}`);
      text.textContent = names.length ? `${names.join(" and ")} service down` : "Services degraded";
    }
  } catch {
    pill.dataset.state = "down";
    text.textContent = "Gateway unreachable";
  }
}

// --- start -----------------------------------------------------------------------------------

async function loadConfig() {
  for (let attempt = 0; ; attempt += 1) {
    try {
      page.config = await api.config();
      form.applyConfig(page.config);
      tryIt.applyConfig(page.config);
      return;
    } catch (error) {
      const box = $("#form-error");
      box.textContent = `The training config could not be loaded (${error.message}). Retrying…`;
      box.hidden = false;
      await new Promise((resolve) =>
        window.setTimeout(resolve, Math.min(10000, 1000 * 2 ** attempt)),
      );
      box.hidden = true;
    }
  }
}

function readHash() {
  const params = hashParams();
  const token = params.get("token");
  if (token) setToken(token); // `oneseek up` prints the page's URL with the token in it
  const runId = params.get("run");
  writeHash(runId); // the token leaves the address bar (and the history) at once
  return runId;
}

async function main() {
  const runFromHash = readHash();
  showTokenState();
  renderAll();
  refreshHealth();
  window.setInterval(refreshHealth, HEALTH_POLL_MS);
  await loadConfig();
  loadCatalog();
  if (runFromHash) selectRun(runFromHash, { user: true });
  await refreshHistory();
  window.setInterval(refreshHistory, HISTORY_POLL_MS);
}

window.addEventListener("hashchange", () => {
  const runId = readHash();
  if (runId && runId !== page.run?.runId) selectRun(runId, { user: true });
});

main();
