// Run history: newest first, each run with its status, best model, DNA and the run folder's
// JSON files. Choosing a run shows it in the leaderboard.

import { ARTIFACTS, artifactUrl } from "./api.js";
import { DASH, formatDateTime, formatRelative, statusLabel } from "./format.js";

function cell(label, className = "") {
  const td = document.createElement("td");
  td.dataset.label = label;
  if (className) td.className = className;
  return td;
}

export function statusBadge(status) {
  const badge = document.createElement("span");
  badge.className = `status-badge status-${status || "unknown"}`;
  badge.textContent = statusLabel(status);
  return badge;
}

export function artifactLinks(runId, className = "artifact-links") {
  const list = document.createElement("ul");
  list.className = className;
  list.setAttribute("aria-label", `Files of ${runId}`);
  for (const artifact of ARTIFACTS) {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = artifactUrl(runId, artifact.name);
    link.className = "artifact-link";
    link.dataset.runId = runId;
    link.dataset.artifact = artifact.name;
    link.textContent = artifact.label;
    link.title = artifact.name;
    item.append(link);
    list.append(item);
  }
  return list;
}

export function dnaCode(dna) {
  const code = document.createElement("code");
  code.className = "dna";
  if (!dna) {
    code.textContent = DASH;
    return code;
  }
  code.textContent = dna.length > 22 ? `${dna.slice(0, 20)}…` : dna;
  code.title = dna;
  return code;
}

/**
 * Render `runs` into `tbody`. `selectedRunId` is marked; a click on a run's name calls
 * onSelect(runId). At most `limit` rows (the caller offers the rest).
 */
export function renderHistory(tbody, runs, { selectedRunId, onSelect, limit = Infinity }) {
  const rows = runs.slice(0, limit).map((run) => {
    const tr = document.createElement("tr");
    tr.dataset.runId = run.run_id;
    if (run.run_id === selectedRunId) {
      tr.classList.add("is-selected");
      tr.setAttribute("aria-current", "true");
    }

    const name = cell("Run", "run-cell");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "run-link";
    button.textContent = run.run_id;
    button.setAttribute("aria-label", `Show ${run.run_id} in the leaderboard`);
    button.addEventListener("click", () => onSelect(run.run_id));
    const when = document.createElement("span");
    when.className = "run-when";
    const started = run.started_at || run.updated_at;
    when.textContent = `${formatRelative(started)} · ${run.dataset_id || DASH}`;
    when.title = formatDateTime(started);
    name.append(button, when);

    const status = cell("Status");
    status.append(statusBadge(run.status));
    const epochs = document.createElement("span");
    epochs.className = "run-epochs num";
    epochs.textContent = `${run.current_epoch ?? 0}/${run.total_epochs ?? DASH} epochs`;
    status.append(epochs);

    const models = cell("Models", "models-cell");
    models.textContent = (run.base_models ?? []).join(", ") || DASH;

    const best = cell("Best model", "best-cell");
    best.textContent = run.best_model || DASH;

    const dna = cell("DNA");
    dna.append(dnaCode(run.dna));

    const files = cell("Files");
    files.append(artifactLinks(run.run_id));

    tr.append(name, status, models, best, dna, files);
    return tr;
  });
  tbody.replaceChildren(...rows);
}
