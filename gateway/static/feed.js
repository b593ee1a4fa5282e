// The live feed of one run: /ws/training?runId=…&since=…, reconnected by itself with the last
// seq seen, so a network blip or a gateway restart loses nothing on screen.

import { getToken } from "./api.js";

const MAX_DELAY_MS = 15000;
const FIRST_DELAY_MS = 500;
// heartbeats come every 30 s: two missed in a row means the connection is dead, whatever TCP says
const SILENCE_LIMIT_MS = 75000;
const CLOSE_NORMAL = 1000;
const CLOSE_GOING_AWAY = 1001;
const CLOSE_POLICY = 1008;
const CLOSE_TRY_AGAIN = 1013;
const CLOSE_GAP = 4000; // ours: a seq was skipped, so ask again from the last one seen

function isLoopback(hostname) {
  const name = hostname.replace(/^\[|\]$/g, "").toLowerCase();
  return (
    name === "localhost" || name.endsWith(".localhost") || name === "::1" || /^127\./.test(name)
  );
}

export function feedUrl(runId, since, base = window.location, token = getToken()) {
  const scheme = base.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams({ runId });
  if (since !== null && since !== undefined) query.set("since", String(since));
  // off loopback the feed needs the admin token, and a browser cannot send it as a header
  if (token && !isLoopback(base.hostname)) query.set("token", token);
  return `${scheme}//${base.host}/ws/training?${query}`;
}

/** Delay before reconnect attempt `attempt` (0-based): 0.5 s doubling to 15 s, ±25 % jitter. */
export function backoffDelay(attempt, random = Math.random) {
  const base = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** attempt);
  return Math.round(base * (0.75 + random() * 0.5));
}

/**
 * States reported to onStatus: "connecting", "live", "reconnecting" (with retryAt), "finished"
 * (closed by us after the run ended), "error" (1008: the run cannot be watched; no retry).
 * `lastSeq()` tells the feed where the page's state stands; null before any initial_state.
 */
export class RunFeed {
  constructor(runId, { lastSeq, onMessage, onStatus }) {
    this.runId = runId;
    this.lastSeq = lastSeq;
    this.onMessage = onMessage;
    this.onStatus = onStatus;
    this.socket = null;
    this.attempt = 0;
    this.timer = null;
    this.watchdog = null;
    this.stopped = false;
    this.errorMessage = null;
    this.gapRetried = false;
    this.onOnline = () => {
      if (this.timer !== null) this.reconnectNow();
    };
  }

  start() {
    window.addEventListener("online", this.onOnline);
    this.connect();
    return this;
  }

  /** Close for good (another run was chosen, or this one ended). */
  close(state = "finished") {
    this.stopped = true;
    window.removeEventListener("online", this.onOnline);
    clearTimeout(this.timer);
    clearTimeout(this.watchdog);
    this.timer = null;
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.onclose = null;
      socket.onmessage = null;
      socket.onerror = null;
      try {
        socket.close(CLOSE_NORMAL);
      } catch {
        // already closing
      }
    }
    this.report(state);
  }

  report(state, extra = {}) {
    this.onStatus?.({ state, attempt: this.attempt, ...extra });
  }

  connect() {
    this.timer = null;
    if (this.stopped) return;
    this.report(this.attempt === 0 ? "connecting" : "reconnecting", { retryAt: null });
    let socket;
    try {
      socket = new WebSocket(feedUrl(this.runId, this.lastSeq()));
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    this.errorMessage = null;
    socket.onopen = () => {
      this.armWatchdog();
      // live from the handshake on: a reconnect with `since` to a quiet run may get no
      // message for a while (the backoff only resets once one arrives)
      this.report("live");
    };
    socket.onmessage = (message) => this.receive(socket, message);
    socket.onclose = (event) => this.closed(socket, event);
    // onerror is always followed by onclose, which decides what to do
    socket.onerror = () => {};
  }

  armWatchdog() {
    clearTimeout(this.watchdog);
    this.watchdog = setTimeout(() => {
      if (this.socket) this.socket.close(CLOSE_GAP, "silent");
    }, SILENCE_LIMIT_MS);
  }

  receive(socket, message) {
    if (socket !== this.socket) return;
    this.armWatchdog();
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return; // not ours to interpret
    }
    if (event.type === "error") {
      this.errorMessage = event.message || "The gateway refused to stream this run.";
      return;
    }
    const seen = this.lastSeq();
    if (event.type !== "initial_state" && seen !== null && typeof event.seq === "number") {
      // a heartbeat carries the run's last seq: ahead of ours means events went missing
      if (event.seq > seen + (event.type === "heartbeat" ? 0 : 1)) {
        if (!this.gapRetried) {
          this.gapRetried = true;
          socket.close(CLOSE_GAP, "gap");
          return;
        }
      } else if (event.type !== "heartbeat") {
        this.gapRetried = false;
      }
    }
    this.attempt = 0;
    this.onMessage(event);
  }

  closed(socket, event) {
    if (socket !== this.socket) return;
    this.socket = null;
    clearTimeout(this.watchdog);
    if (this.stopped) return;
    if (event.code === CLOSE_POLICY) {
      this.stopped = true;
      window.removeEventListener("online", this.onOnline);
      this.report("error", {
        message:
          this.errorMessage ||
          event.reason ||
          `The gateway refused to stream run ${this.runId} (close code 1008).`,
      });
      return;
    }
    if (event.code === CLOSE_TRY_AGAIN || event.code === CLOSE_GAP) {
      // we fell behind (1013) or saw a gap: ask again at once from the last seq we hold
      this.reconnectSoon(this.attempt === 0 ? 100 : backoffDelay(this.attempt));
      return;
    }
    // 1001 (gateway shutting down), 1006 (network), anything else: back off and retry
    this.scheduleReconnect(event.code === CLOSE_GOING_AWAY ? "The gateway restarted." : null);
  }

  reconnectSoon(delay) {
    this.attempt += 1;
    this.timer = setTimeout(() => this.connect(), delay);
    this.report("reconnecting", { retryAt: Date.now() + delay });
  }

  scheduleReconnect(reason = null) {
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.timer = setTimeout(() => this.connect(), delay);
    this.report("reconnecting", { retryAt: Date.now() + delay, message: reason });
  }

  reconnectNow() {
    clearTimeout(this.timer);
    this.connect();
  }
}
