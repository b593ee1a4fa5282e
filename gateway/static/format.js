// Display formatting. Numbers arrive at full precision and are rounded only here, for the eye.

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const oneDecimal = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

export const DASH = "—";

export function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

/** Validation loss: four decimals, as the leaderboard promises. */
export function formatLoss(value) {
  return isNumber(value) ? value.toFixed(4) : DASH;
}

/** A learning-rate multiplier such as ×1.300. */
export function formatWeight(value) {
  return isNumber(value) ? `×${value.toFixed(3)}` : DASH;
}

/** An effective learning rate: 0.000148 reads better as 1.48e-4. */
export function formatLr(value) {
  if (!isNumber(value)) return DASH;
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 0.01 && abs < 1000) return String(Number(value.toPrecision(3)));
  return value.toExponential(2).replace("e+", "e");
}

export function formatPercent(value, digits = 1) {
  return isNumber(value) ? `${value.toFixed(digits)}%` : DASH;
}

export function formatRate(tokensPerSecond) {
  if (!isNumber(tokensPerSecond)) return DASH;
  const text =
    tokensPerSecond >= 100 ? integer.format(tokensPerSecond) : oneDecimal.format(tokensPerSecond);
  return `${text} tok/s`;
}

/** 7241728 -> "7.24M", 1.3e9 -> "1.3B": parameter counts span eight orders of magnitude. */
export function formatCount(value) {
  if (!isNumber(value)) return DASH;
  const units = [
    [1e12, "T"],
    [1e9, "B"],
    [1e6, "M"],
    [1e3, "K"],
  ];
  for (const [size, unit] of units) {
    if (Math.abs(value) >= size) {
      return `${Number((value / size).toPrecision(3))}${unit}`;
    }
  }
  return integer.format(value);
}

/** 15032385536 -> "14.0 GiB", 8821760 -> "8.4 MiB": memory as the plan speaks of it. */
export function formatBytes(value) {
  if (!isNumber(value)) return DASH;
  const units = [
    [1024 ** 3, "GiB"],
    [1024 ** 2, "MiB"],
    [1024, "KiB"],
  ];
  for (const [size, unit] of units) {
    if (Math.abs(value) >= size) return `${(value / size).toFixed(1)} ${unit}`;
  }
  return `${integer.format(value)} B`;
}

/** A short span as "0.042 s", "0.91 s", "12.3 s": a first token's wait, a generation's time. */
export function formatSeconds(seconds) {
  if (!isNumber(seconds) || seconds < 0) return DASH;
  if (seconds < 0.1) return `${seconds.toFixed(3)} s`;
  return `${seconds < 10 ? seconds.toFixed(2) : seconds.toFixed(1)} s`;
}

/** Seconds as "1h 02m", "3m 05s" or "42s". */
export function formatDuration(seconds) {
  if (!isNumber(seconds) || seconds < 0) return DASH;
  const total = Math.round(seconds);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${s}s`;
}

export function formatDateTime(iso) {
  if (!iso) return DASH;
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return DASH;
  return date.toLocaleString(undefined, {
    year: "numeric",
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
  });
}

/** "just now", "4 min ago", "3 h ago", then the date. */
export function formatRelative(iso, now = Date.now()) {
  if (!iso) return DASH;
  const then = new Date(iso).getTime();
  if (Number.isNaN(then)) return DASH;
  const seconds = Math.max(0, (now - then) / 1000);
  if (seconds < 45) return "just now";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return formatDateTime(iso);
}

const STATUS_LABELS = {
  running: "Running",
  completed: "Completed",
  auto_stopped: "Auto-stopped",
  stopped: "Stopped",
  failed: "Failed",
  interrupted: "Interrupted",
};

export function statusLabel(status) {
  return STATUS_LABELS[status] ?? (status ? String(status) : "Unknown");
}
