// Run history: newest first, each run with its status, best model, DNA and the run folder's
// JSON files. Choosing a run shows it in the leaderboard.

import { ARTIFACTS, artifactUrl } from "./api.js";
import { element } from "./dom.js";
import { DASH, formatDateTime, formatRelative, statusLabel } from "./format.js";

function cell(label, className = "") {
  const td = element("td", className);
  td.dataset.label = label;
  return td;
}

export function statusBadge(status) {
  return element("span", `status-badge status-${status || "unknown"}`, statusLabel(status));
}

export function artifactLinks(runId, className = "artifact-links") {
  const list = element("ul", className);
  list.setAttribute("aria-label", `Files of ${runId}`);
  for (const artifact of ARTIFACTS) {
    const link = element("a", "artifact-link", artifact.label);
    link.href = artifactUrl(runId, artifact.name);
    link.dataset.runId = runId;
    link.dataset.artifact = artifact.name;
    link.title = artifact.name;
    const item = element("li");
    item.append(link);
    list.append(item);
  }
  return list;
}

export function dnaCode(dna) {
  const shown = dna && dna.length > 22 ? `${dna.slice(0, 20)}…` : dna || DASH;
  const code = element("code", "dna", shown);
  if (dna) code.title = dna;
  return code;
}

/**
 * Render `runs` into `tbody`. `selectedRunId` is marked; a click on a run's name calls
 * onSelect(runId). At most `limit` rows (the caller offers the rest).
 */
export function renderHistory(tbody, runs, { selectedRunId, onSelect, limit = Infinity }) {
  const rows = runs.slice(0, limit).map((run) => {
    const tr = element("tr");
    tr.dataset.runId = run.run_id;
    if (run.run_id === selectedRunId) {
      tr.classList.add("is-selected");
      tr.setAttribute("aria-current", "true");
    }

    const name = cell("Run", "run-cell");
    const button = element("button", "run-link", run.run_id);
    button.type = "button";
    button.setAttribute("aria-label", `Show ${run.run_id} in the leaderboard`);
    button.addEventListener("click", () => onSelect(run.run_id));
    const started = run.started_at || run.updated_at;
    const place = `${formatRelative(started)} · ${run.dataset_id || DASH}`;
    const when = element("span", "run-when", place);
    when.title = formatDateTime(started);
    name.append(button, when);

    const status = cell("Status");
    status.append(statusBadge(run.status));
    const epochs = `${run.current_epoch ?? 0}/${run.total_epochs ?? DASH} epochs`;
    status.append(element("span", "run-epochs num", epochs));

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
