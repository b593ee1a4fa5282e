// The gateway's REST routes: JSON in and out (or Server-Sent Events out), the admin token as a
// Bearer header, and the error envelope {"error", "message", "field"} turned into an ApiError the
// form can place.

import { SseParser } from "./sse.js";

const TOKEN_KEY = "oneseek.adminToken";
let memoryToken = "";

/** The admin token lives in sessionStorage: it survives a reload, not the closing of the tab. */
export function getToken() {
  let stored = "";
  try {
    stored = sessionStorage.getItem(TOKEN_KEY) ?? "";
  } catch {
    // storage can be disabled (private mode, policy): the token then lasts as long as the page
  }
  return stored || memoryToken;
}

export function setToken(token) {
  memoryToken = token;
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // see getToken
  }
}

export class ApiError extends Error {
  constructor(status, code, message, field, data = null) {
    super(message);
    this.data = data;
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.field = field ?? null;
  }
}

const FALLBACK_MESSAGES = {
  0: "The gateway cannot be reached. Check that `oneseek up` (or the gateway) is running.",
  401: "The admin token was missing or wrong. Enter the token printed by `oneseek up`.",
  404: "Not found.",
  413: "The request is too large.",
  503: "A service behind the gateway is not answering. It is retried automatically.",
};

/** fetch() with the token and a JSON body; ApiError (status 0) when nothing answered. */
async function send(path, { method, body, signal, accept }) {
  const headers = { Accept: accept };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    return await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error?.name === "AbortError") throw error;
    throw new ApiError(0, "unreachable", FALLBACK_MESSAGES[0], null);
  }
}

function parseJson(text) {
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/** The ApiError of a non-2xx answer whose body (`data`, parsed) may be the error envelope. */
function refusal(response, data) {
  const message =
    (data && typeof data.message === "string" && data.message) ||
    FALLBACK_MESSAGES[response.status] ||
    `The gateway answered ${response.status} ${response.statusText}.`;
  return new ApiError(
    response.status,
    data?.error ?? `http_${response.status}`,
    message,
    data?.field,
    data,
  );
}

/**
 * fetch() a gateway route. `body` is sent as JSON. Resolves to the parsed JSON answer; rejects
 * with ApiError (status 0 when the gateway could not be reached at all).
 */
export async function request(path, { method = "GET", body, signal } = {}) {
  const response = await send(path, { method, body, signal, accept: "application/json" });
  const data = parseJson(await response.text());
  if (!response.ok) throw refusal(response, data);
  return data;
}

const STREAM_BROKEN =
  "The connection to the gateway broke while the answer streamed. Check that it is running.";

/**
 * POST `body` to a route that answers with Server-Sent Events; `onEvent(name, data)` gets each
 * event as it arrives, its data parsed as JSON. Resolves when the stream ends. Rejects with
 * ApiError for a refusal before the stream began (the error envelope) or a connection that
 * broke during it, and with the AbortError of `signal`.
 */
export async function stream(path, { body, signal, onEvent }) {
  const response = await send(path, { method: "POST", body, signal, accept: "text/event-stream" });
  if (!response.ok) throw refusal(response, parseJson(await response.text()));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  const deliver = (events) => {
    for (const { event, data } of events) onEvent(event, parseJson(data) ?? {});
  };
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      if (error?.name === "AbortError" || signal?.aborted) throw error;
      throw new ApiError(0, "stream_broken", STREAM_BROKEN, null);
    }
    if (chunk.done) break;
    deliver(parser.push(decoder.decode(chunk.value, { stream: true })));
  }
  deliver(parser.push(decoder.decode()));
  deliver(parser.end());
}

export const api = {
  config: () => request("/api/config"),
  health: () =>
    request("/healthz").catch((error) => {
      // 503 still carries the body that says which service is down
      if (error instanceof ApiError && error.status === 503)
        return error.data ?? { status: "degraded" };
      throw error;
    }),
  models: () => request("/api/admin/models"),
  datasets: () => request("/api/admin/datasets"),
  runs: () => request("/api/training/runs"),
  active: () => request("/api/training/active"),
  metrics: (runId) => request(`/api/training/${encodeURIComponent(runId)}/metrics`),
  start: (body) => request("/api/admin/training/start-dna-v2", { method: "POST", body }),
  stop: (runId) =>
    request(`/api/admin/training/${encodeURIComponent(runId)}/stop`, { method: "POST" }),
  resume: (runId) =>
    request(`/api/admin/training/${encodeURIComponent(runId)}/resume`, { method: "POST" }),
  /** A finished run's models answer `body.prompt`; see stream() for `onEvent` and `signal`. */
  generate: (runId, body, { signal, onEvent }) =>
    stream(`/api/training/${encodeURIComponent(runId)}/generate`, { body, signal, onEvent }),
  artifact: (runId, name) =>
    request(`/api/training/${encodeURIComponent(runId)}/artifacts/${encodeURIComponent(name)}`),
};

export function artifactUrl(runId, name) {
  return `/api/training/${encodeURIComponent(runId)}/artifacts/${encodeURIComponent(name)}`;
}

export const ARTIFACTS = [
  { name: "live_metrics.json", label: "Live metrics" },
  { name: "training_results.json", label: "Results" },
  { name: "oneseek_dna.json", label: "DNA" },
  { name: "ledger_proof.json", label: "Ledger proof" },
];
