// The leaderboard rows: one per model, kept as the same DOM nodes across updates so that a
// change of rank can slide (FLIP: measure, reorder, play the difference back to zero).

import { element } from "./dom.js";
import { formatBytes, formatCount, formatLoss, formatLr, formatWeight, isNumber } from "./format.js";

const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");

function labelled(className, label) {
  const cell = element("span", `board-cell ${className}`);
  cell.append(element("span", "cell-label", label));
  return cell;
}

function createRow(name) {
  const row = element("li", "board-row");
  row.dataset.model = name;

  const rank = element("span", "rank-badge");
  const model = element("span", "board-cell model-cell");
  const swatch = element("span", "model-swatch");
  swatch.setAttribute("aria-hidden", "true");
  const title = element("span", "model-title");
  title.append(element("span", "model-name", name), element("span", "model-tags"));
  model.append(swatch, title, element("span", "model-meta"));

  const loss = labelled("loss-cell", "Validation loss");
  loss.append(element("span", "loss-value num"), element("span", "loss-trend num"));

  const weight = labelled("weight-cell", "Weight");
  const bar = element("span", "weight-bar");
  bar.setAttribute("role", "meter");
  bar.append(element("span", "weight-neutral"), element("span", "weight-fill"));
  weight.append(bar, element("span", "weight-value num"));

  const lr = labelled("lr-cell", "Effective LR");
  const short = element("span", "lr-prefix", "LR");
  short.setAttribute("aria-hidden", "true");
  lr.append(short, element("span", "lr-value num"));

  const device = labelled("device-cell", "Device");
  device.append(element("span", "device-name"), element("span", "device-need num"));

  row.append(rank, model, loss, weight, lr, device);
  return row;
}

function tag(text, kind) {
  return element("span", `tag tag-${kind}`, text);
}

/** Where `value` sits on the [min, max] track, 0 to 1. */
export function trackPosition(value, min, max) {
  if (!(max > min)) return 0.5;
  return Math.min(1, Math.max(0, (value - min) / (max - min)));
}

function updateRow(row, data, context) {
  const { colorOf, minWeight, maxWeight, trainingModel, bestModel } = context;
  row.style.setProperty("--series-color", colorOf(data.name));
  row.dataset.rank = data.rank ?? "";

  const badge = row.querySelector(".rank-badge");
  badge.textContent = data.rank ?? "–";
  badge.className = `rank-badge${data.rank && data.rank <= 3 ? ` rank-${data.rank}` : ""}`;
  badge.setAttribute("aria-label", data.rank ? `Rank ${data.rank}` : "Not ranked yet");

  const tags = row.querySelector(".model-tags");
  const tagNodes = [];
  if (bestModel === data.name) tagNodes.push(tag("best", "best"));
  if (trainingModel === data.name) tagNodes.push(tag("training", "training"));
  tags.replaceChildren(...tagNodes);

  const info = data.model;
  const meta = [];
  if (info?.architecture) meta.push(info.architecture);
  if (isNumber(info?.parameter_count) && info.parameter_count > 0) {
    meta.push(`${formatCount(info.parameter_count)} params`);
  }
  row.querySelector(".model-meta").textContent = meta.join(" · ");

  const loss = row.querySelector(".loss-value");
  loss.textContent = formatLoss(data.loss);
  loss.title = isNumber(data.loss) ? String(data.loss) : "";
  const trend = row.querySelector(".loss-trend");
  if (isNumber(data.loss) && isNumber(data.previousLoss)) {
    const change = data.loss - data.previousLoss;
    trend.textContent = `${change <= 0 ? "▼" : "▲"} ${Math.abs(change).toFixed(4)}`;
    trend.className = `loss-trend num ${change <= 0 ? "is-better" : "is-worse"}`;
    trend.title = `Change since the previous epoch: ${change}`;
  } else {
    trend.textContent = "";
    trend.className = "loss-trend num";
    trend.title = "";
  }

  const weight = isNumber(data.weight) ? data.weight : 1;
  const from = trackPosition(Math.min(1, weight), minWeight, maxWeight);
  const to = trackPosition(Math.max(1, weight), minWeight, maxWeight);
  const bar = row.querySelector(".weight-bar");
  bar.style.setProperty("--neutral", String(trackPosition(1, minWeight, maxWeight)));
  bar.style.setProperty("--from", String(from));
  bar.style.setProperty("--to", String(to));
  bar.classList.toggle("is-boosted", weight > 1 + 1e-9);
  bar.classList.toggle("is-penalised", weight < 1 - 1e-9);
  bar.setAttribute("aria-valuemin", String(minWeight));
  bar.setAttribute("aria-valuemax", String(maxWeight));
  bar.setAttribute("aria-valuenow", String(weight));
  bar.setAttribute("aria-label", `Weight of ${data.name}`);
  bar.setAttribute("aria-valuetext", formatWeight(data.weight));
  const exact = isNumber(data.weight) ? data.weight : "—";
  bar.title = `Weight ${exact} on [${minWeight}, ${maxWeight}]`;
  row.querySelector(".weight-value").textContent = formatWeight(data.weight);

  // where the memory plan put the model, and the peak it expects there
  const placement = info?.placement ?? null;
  const device = row.querySelector(".device-cell");
  row.querySelector(".device-name").textContent = placement?.device
    ? `${placement.device}${placement.offloaded ? " ⇄" : ""}`
    : "—";
  row.querySelector(".device-name").title = placement?.node ? `Ray node ${placement.node}` : "";
  row.querySelector(".device-need").textContent = placement
    ? `~${formatBytes(placement.estimated_bytes)} ${placement.precision ?? ""}`.trim()
    : "";
  device.title = placement
    ? `Estimated peak ${formatBytes(placement.estimated_bytes)}: weights ` +
      `${formatBytes(placement.weight_bytes)}, gradients ${formatBytes(placement.gradient_bytes)}, ` +
      `optimizer ${formatBytes(placement.optimizer_bytes)}, activations ` +
      `${formatBytes(placement.activation_bytes)}, runtime ${formatBytes(placement.overhead_bytes)}` +
      (placement.offloaded ? "; held in host memory between its turns" : "")
    : "";

  const lr = row.querySelector(".lr-value");
  lr.textContent = formatLr(data.lr);
  lr.title = isNumber(data.lr)
    ? `learning rate × weight = ${data.lr}` +
      (isNumber(data.appliedLr) ? `; read back from the optimizer: ${data.appliedLr}` : "")
    : "";
}

/**
 * Show `rows` (leaderboardRows order) in `list`; rows whose rank changed slide to their place.
 * Returns the names whose rank improved, for the announcement.
 */
export function renderLeaderboard(list, rows, context) {
  const existing = new Map([...list.children].map((node) => [node.dataset.model, node]));
  const before = new Map();
  const oldRanks = new Map();
  for (const [name, node] of existing) {
    before.set(name, node.getBoundingClientRect().top);
    oldRanks.set(name, Number(node.dataset.rank) || null);
  }
  const keep = new Set(rows.map((row) => row.name));
  for (const [name, node] of existing) if (!keep.has(name)) node.remove();

  const climbed = [];
  for (const data of rows) {
    const node = existing.get(data.name) ?? createRow(data.name);
    updateRow(node, data, context);
    list.appendChild(node); // moves an existing node: the list ends in `rows` order
    const oldRank = oldRanks.get(data.name);
    if (oldRank && data.rank && data.rank !== oldRank) {
      node.classList.remove("rank-up", "rank-down");
      void node.offsetWidth; // restart the highlight animation
      node.classList.add(data.rank < oldRank ? "rank-up" : "rank-down");
      if (data.rank < oldRank) climbed.push(data.name);
    }
  }

  if (!reducedMotion.matches) {
    for (const node of list.children) {
      const first = before.get(node.dataset.model);
      if (first === undefined) continue;
      const delta = first - node.getBoundingClientRect().top;
      if (Math.abs(delta) < 1) continue;
      node.animate([{ transform: `translateY(${delta}px)` }, { transform: "translateY(0)" }], {
        duration: 550,
        easing: "cubic-bezier(0.2, 0.8, 0.2, 1)",
      });
    }
  }
  return climbed;
}
