// Line charts in plain SVG: one line per model over epochs, axes with round ticks, a legend
// with each model's latest value. Redrawn whole on each update (a few dozen points at most).

import { element } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";

export const PALETTE = [
  "#4f46e5",
  "#0891b2",
  "#d97706",
  "#db2777",
  "#16a34a",
  "#7c3aed",
  "#dc2626",
  "#0d9488",
  "#65a30d",
  "#64748b",
];

export function colorFor(index) {
  return PALETTE[index % PALETTE.length];
}

function svg(name, attributes = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (parent) parent.appendChild(node);
  return node;
}

/** Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten. */
export function niceTicks(low, high, count = 5) {
  if (!Number.isFinite(low) || !Number.isFinite(high)) return [];
  if (high < low) [low, high] = [high, low];
  if (high === low) {
    const pad = Math.abs(low) * 0.1 || 1;
    low -= pad;
    high += pad;
  }
  const raw = (high - low) / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) ?? 10 * power;
  const first = Math.ceil(low / step - 1e-9) * step;
  const ticks = [];
  for (let value = first; value <= high + step * 1e-9; value += step) {
    ticks.push(Number(value.toPrecision(12)));
  }
  return ticks;
}

function integerTicks(low, high, maxTicks) {
  const span = Math.max(1, high - low);
  const step =
    [1, 2, 5, 10, 20, 25, 50].find((s) => span / s <= maxTicks) ?? Math.ceil(span / maxTicks);
  const ticks = [];
  for (let x = Math.ceil(low / step) * step; x <= high; x += step) ticks.push(x);
  return ticks;
}

/**
 * options: title (for the accessible name), yFormat(value) -> text, tickFormat(value) -> text,
 * xLabel, yLabel, domain(seriesValues) -> [low, high] (default: data range, padded),
 * reference (a y value drawn as a dashed line), xStart (first epoch on the axis).
 */
export class LineChart {
  constructor(host, legend, options) {
    this.host = host;
    this.legend = legend;
    this.options = options;
    this.series = [];
    this.xMax = 1;
    this.width = 0;
    this.observer = new ResizeObserver(() => {
      const width = Math.round(this.host.clientWidth);
      if (width !== this.width) this.render();
    });
    this.observer.observe(host);
  }

  update(series, xMax) {
    this.series = series;
    this.xMax = Math.max(1, xMax || 1);
    this.render();
    this.renderLegend();
  }

  domain() {
    const values = this.series.flatMap((s) => s.points.map((p) => p.y)).filter(Number.isFinite);
    if (this.options.domain) return this.options.domain(values);
    if (!values.length) return [0, 1];
    let low = Math.min(...values);
    let high = Math.max(...values);
    const pad = (high - low) * 0.08 || Math.abs(high) * 0.05 || 0.5;
    low -= pad;
    high += pad;
    return [low, high];
  }

  render() {
    const { host, options } = this;
    this.width = Math.round(host.clientWidth);
    const width = Math.max(240, this.width);
    const height = Math.round(host.clientHeight) || 220;
    const compact = width < 420;
    const margin = { top: 14, right: 16, bottom: 38, left: compact ? 46 : 56 };
    const innerWidth = width - margin.left - margin.right;
    const innerHeight = height - margin.top - margin.bottom;
    const xStart = options.xStart ?? 1;
    const xLow = xStart;
    const xHigh = Math.max(this.xMax, xStart + 1);
    const [yLow, yHigh] = this.domain();
    const x = (value) => margin.left + ((value - xLow) / (xHigh - xLow)) * innerWidth;
    const y = (value) => margin.top + (1 - (value - yLow) / (yHigh - yLow || 1)) * innerHeight;

    const root = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      role: "img",
      "aria-label": this.describe(),
      class: "chart-svg",
    });

    const grid = svg("g", { class: "chart-gridlines" }, root);
    const empty = !this.series.some((s) => s.points.length);
    // with no data, a made-up value axis would mislead; a fixed one (weights) still helps
    const showYTicks = !empty || Boolean(options.domain);
    const yTicks = showYTicks
      ? niceTicks(yLow, yHigh, compact ? 4 : 5).filter((v) => v >= yLow && v <= yHigh)
      : [];
    const tickFormat = options.tickFormat ?? ((v) => String(v));
    for (const value of yTicks) {
      svg("line", { x1: margin.left, x2: width - margin.right, y1: y(value), y2: y(value) }, grid);
      const label = svg(
        "text",
        {
          x: margin.left - 8,
          y: y(value),
          class: "chart-tick",
          "text-anchor": "end",
          dy: "0.32em",
        },
        grid,
      );
      label.textContent = tickFormat(value);
    }
    const xTicks = integerTicks(xLow, xHigh, compact ? 6 : 12);
    for (const value of xTicks) {
      const label = svg(
        "text",
        {
          x: x(value),
          y: height - margin.bottom + 18,
          class: "chart-tick",
          "text-anchor": "middle",
        },
        grid,
      );
      label.textContent = String(value);
    }
    svg(
      "line",
      {
        class: "chart-axis",
        x1: margin.left,
        x2: width - margin.right,
        y1: margin.top + innerHeight,
        y2: margin.top + innerHeight,
      },
      grid,
    );
    if (options.xLabel) {
      const label = svg(
        "text",
        {
          x: margin.left + innerWidth / 2,
          y: height - 4,
          class: "chart-label",
          "text-anchor": "middle",
        },
        grid,
      );
      label.textContent = options.xLabel;
    }
    const reference = options.reference;
    if (!empty && reference !== undefined && reference >= yLow && reference <= yHigh) {
      svg(
        "line",
        {
          class: "chart-reference",
          x1: margin.left,
          x2: width - margin.right,
          y1: y(reference),
          y2: y(reference),
        },
        root,
      );
    }

    const yFormat = options.yFormat ?? ((v) => String(v));
    this.series.forEach((series, index) => {
      if (!series.points.length) return;
      const color = series.color ?? colorFor(index);
      const group = svg("g", { class: "chart-series", "data-model": series.name }, root);
      group.style.setProperty("--series-color", color);
      const d = series.points
        .map((p, i) => `${i ? "L" : "M"}${x(p.x).toFixed(2)},${y(p.y).toFixed(2)}`)
        .join("");
      svg("path", { d, class: "chart-line" }, group);
      series.points.forEach((p, i) => {
        const last = i === series.points.length - 1;
        const dot = svg(
          "circle",
          {
            cx: x(p.x).toFixed(2),
            cy: y(p.y).toFixed(2),
            r: last ? 4.5 : 3,
            class: last ? "chart-point is-last" : "chart-point",
            "data-epoch": p.x,
          },
          group,
        );
        const tip = svg("title", {}, dot);
        tip.textContent = `${series.name} · epoch ${p.x}: ${yFormat(p.y)}`;
      });
    });

    if (empty) {
      const note = svg(
        "text",
        { x: margin.left + innerWidth / 2, y: margin.top + innerHeight / 2, class: "chart-empty" },
        root,
      );
      note.setAttribute("text-anchor", "middle");
      note.textContent = options.emptyText ?? "Fills in after the first epoch";
    }

    host.replaceChildren(root);
  }

  describe() {
    const { title, yFormat = String } = this.options;
    const latest = this.series
      .filter((s) => s.points.length)
      .map((s) => `${s.name} ${yFormat(s.points[s.points.length - 1].y)}`);
    if (!latest.length) return `${title}: no epoch finished yet.`;
    return `${title}, latest values: ${latest.join(", ")}.`;
  }

  renderLegend() {
    if (!this.legend) return;
    const yFormat = this.options.yFormat ?? String;
    const items = this.series.map((series, index) => {
      const swatch = element("span", "legend-swatch");
      swatch.style.setProperty("--series-color", series.color ?? colorFor(index));
      const last = series.points[series.points.length - 1];
      const item = element("li", "legend-item");
      item.append(
        swatch,
        element("span", "legend-name", series.name),
        element("span", "legend-value", last ? yFormat(last.y) : "—"),
      );
      return item;
    });
    this.legend.replaceChildren(...items);
  }
}
