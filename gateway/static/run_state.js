// One run as its websocket events describe it. Pure: no DOM, no clock except what callers pass,
// so a replay after a reconnect lands on exactly the state a page that never blinked would have.

export const TERMINAL_STATUSES = new Set([
  "completed",
  "auto_stopped",
  "stopped",
  "failed",
  "interrupted",
]);

export function createRun(runId) {
  return {
    runId,
    status: null,
    config: null,
    models: [], // [{name, architecture, model_type, parameter_count}]
    names: [], // display order before any loss is known: the order the run was started with
    totalEpochs: 0,
    currentEpoch: 0, // epochs finished
    runningEpoch: 0, // the epoch being trained now (epoch_start / progress)
    valLosses: {},
    weights: {},
    lrMultipliers: {},
    appliedLrs: {},
    totalLoss: null,
    autoStopInfo: null,
    autoStopWindow: null,
    progressPercent: 0,
    progress: null, // the last progress payload, plus receivedAt (ms) for the ETA countdown
    history: [], // epoch_end payloads, one per epoch, ascending
    lastSeq: 0,
    snapshotSeq: null, // seq of the last initial_state: 0 means the run had no event yet
    bestModel: null,
    dna: null,
    runDir: null,
    durationSeconds: null,
    epochsRun: null,
    error: null,
    updatedAt: null,
  };
}

function addNames(run, names) {
  for (const name of names) if (!run.names.includes(name)) run.names.push(name);
}

function mapOrEmpty(value) {
  return value && typeof value === "object" ? value : {};
}

function upsertEpoch(run, payload) {
  const epoch = payload.epoch;
  const at = run.history.findIndex((entry) => entry.epoch >= epoch);
  if (at === -1) run.history.push(payload);
  else if (run.history[at].epoch === epoch) run.history[at] = payload;
  else run.history.splice(at, 0, payload);
}

function applyEpochEnd(run, payload) {
  upsertEpoch(run, payload);
  addNames(run, Object.keys(mapOrEmpty(payload.val_losses)));
  run.valLosses = { ...mapOrEmpty(payload.val_losses) };
  // merged, not replaced: a partial report from an outside process keeps the others' values
  run.weights = { ...run.weights, ...mapOrEmpty(payload.weights) };
  run.lrMultipliers = { ...run.lrMultipliers, ...mapOrEmpty(payload.lr_multipliers) };
  if (payload.total_loss !== undefined) run.totalLoss = payload.total_loss;
  if (payload.auto_stop_info) run.autoStopInfo = payload.auto_stop_info;
  if (typeof payload.progress_percent === "number") run.progressPercent = payload.progress_percent;
  run.currentEpoch = Math.max(run.currentEpoch, payload.current_epoch ?? payload.epoch ?? 0);
  if (payload.total_epochs) run.totalEpochs = payload.total_epochs;
}

function applyInitialState(run, event) {
  const fresh = createRun(run.runId);
  Object.assign(run, fresh);
  run.status = event.status ?? null;
  run.config = event.config ?? null;
  run.models = Array.isArray(event.models) ? event.models : [];
  addNames(run, run.config?.base_models ?? []);
  addNames(
    run,
    run.models.map((model) => model.name),
  );
  run.totalEpochs = event.total_epochs ?? run.config?.epochs ?? 0;
  for (const entry of event.training_history ?? []) applyEpochEnd(run, entry);
  // the snapshot's own fields are the latest truth, whatever the history held
  run.currentEpoch = event.current_epoch ?? run.currentEpoch;
  if (event.val_losses && Object.keys(event.val_losses).length) {
    run.valLosses = { ...event.val_losses };
    addNames(run, Object.keys(event.val_losses));
  }
  run.weights = { ...run.weights, ...mapOrEmpty(event.weights) };
  run.lrMultipliers = { ...run.lrMultipliers, ...mapOrEmpty(event.lr_multipliers) };
  run.totalLoss = event.total_loss ?? run.totalLoss;
  run.autoStopInfo = event.auto_stop_info ?? run.autoStopInfo;
  run.progressPercent = event.progress_percent ?? run.progressPercent;
  run.lastSeq = event.seq ?? 0;
  run.snapshotSeq = run.lastSeq;
}

/**
 * Fold one websocket message into `run`. Returns the message type when it changed the run, or
 * null when it was a duplicate (seq already seen) or carried nothing (heartbeat).
 * `now` (ms) stamps progress so the ETA can count down between events.
 */
export function applyEvent(run, event, now = 0) {
  const type = event?.type;
  if (type === "heartbeat" || type === "error" || !type) return null;
  if (type === "initial_state") {
    applyInitialState(run, event);
    run.updatedAt = event.timestamp ?? run.updatedAt;
    return type;
  }
  if (typeof event.seq === "number") {
    if (event.seq <= run.lastSeq) return null; // already folded in (replay overlap)
    run.lastSeq = event.seq;
  }
  run.updatedAt = event.timestamp ?? run.updatedAt;
  switch (type) {
    case "epoch_start":
      // after a terminal event only a resumed run starts an epoch: it trains again
      if (isFinished(run)) resumeRun(run, event);
      run.status = run.status ?? "running";
      run.runningEpoch = event.epoch;
      if (event.total_epochs) run.totalEpochs = event.total_epochs;
      run.weights = { ...run.weights, ...mapOrEmpty(event.weights) };
      run.lrMultipliers = { ...run.lrMultipliers, ...mapOrEmpty(event.lr_multipliers) };
      addNames(run, Object.keys(mapOrEmpty(event.weights)));
      // the ray executor says on which node each member runs
      if (Array.isArray(event.placement) && event.placement.length) {
        const placed = new Map(event.placement.map((p) => [p.model, p]));
        run.models = run.models.map((model) =>
          placed.has(model.name) ? { ...model, placement: placed.get(model.name) } : model,
        );
      }
      break;
    case "progress":
      run.runningEpoch = Math.max(run.runningEpoch, event.epoch ?? 0);
      run.progress = { ...event, receivedAt: now };
      if (typeof event.progress_percent === "number") run.progressPercent = event.progress_percent;
      break;
    case "epoch_end":
      applyEpochEnd(run, event);
      break;
    case "weight_adjustment":
      run.weights = { ...run.weights, ...mapOrEmpty(event.weights) };
      run.lrMultipliers = { ...run.lrMultipliers, ...mapOrEmpty(event.lr_multipliers) };
      run.appliedLrs = { ...run.appliedLrs, ...mapOrEmpty(event.applied_lrs) };
      break;
    case "auto_stop_triggered":
      if (event.auto_stop_info) run.autoStopInfo = event.auto_stop_info;
      run.autoStopWindow = event.window ?? null;
      break;
    case "training_complete":
      run.status = event.status ?? "completed";
      run.error = null; // a resumed run that ended well is no longer failed
      run.bestModel = event.best_model ?? null;
      run.dna = event.dna || null;
      run.runDir = event.run_dir || null;
      run.durationSeconds = event.duration_seconds ?? null;
      run.epochsRun = event.epochs_run ?? null;
      if (event.val_losses && Object.keys(event.val_losses).length) {
        run.valLosses = { ...event.val_losses };
      }
      run.weights = { ...run.weights, ...mapOrEmpty(event.weights) };
      if (event.total_loss !== undefined && event.total_loss !== null) {
        run.totalLoss = event.total_loss;
      }
      run.progressPercent = 100;
      run.progress = null;
      break;
    case "training_error":
      run.status = event.status ?? "failed";
      run.error = event.message ?? "The run failed.";
      run.progressPercent = 100;
      run.progress = null;
      break;
    default:
      return null; // a newer gateway's event this page does not know: ignore, keep the seq
  }
  return type;
}

function resumeRun(run, event) {
  run.status = "running";
  run.error = null;
  run.bestModel = null;
  run.dna = null;
  run.runDir = null;
  run.durationSeconds = null;
  run.epochsRun = null;
  run.progress = null;
  const total = event.total_epochs || run.totalEpochs;
  if (total) run.progressPercent = (100 * ((event.epoch ?? 1) - 1)) / total;
}

export function isFinished(run) {
  return TERMINAL_STATUSES.has(run.status);
}

/** The epoch to show as "Epoch x/y": the one training now, else the last one finished. */
export function displayEpoch(run) {
  if (run.status === "running") {
    const next = run.currentEpoch < run.totalEpochs ? run.currentEpoch + 1 : run.currentEpoch;
    return Math.max(run.runningEpoch, next);
  }
  return run.epochsRun ?? run.currentEpoch;
}

/**
 * Leaderboard rows, sorted by validation loss (lowest first, ties by name, as the ranking rule
 * does); models with no loss yet keep their start order below the ranked ones.
 */
export function leaderboardRows(run) {
  const previous = run.history.length >= 2 ? run.history[run.history.length - 2].val_losses : {};
  const info = new Map(run.models.map((model) => [model.name, model]));
  const rows = run.names.map((name, order) => ({
    name,
    order,
    loss: run.valLosses[name],
    previousLoss: previous?.[name],
    weight: run.weights[name],
    lr: run.lrMultipliers[name],
    appliedLr: run.appliedLrs[name],
    model: info.get(name) ?? null,
    rank: null,
  }));
  const ranked = rows.filter((row) => typeof row.loss === "number" && Number.isFinite(row.loss));
  const unranked = rows.filter((row) => !ranked.includes(row));
  ranked.sort((a, b) => a.loss - b.loss || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  ranked.forEach((row, index) => {
    row.rank = index + 1;
  });
  return [...ranked, ...unranked];
}

/** Best model: the one the run named, else the lowest latest loss. */
export function bestModel(run) {
  if (run.bestModel) return run.bestModel;
  const [first] = leaderboardRows(run);
  return first && first.rank === 1 ? first.name : null;
}

/** Chart series from the epoch history: one line per model, points at full precision. */
export function lossSeries(run) {
  return run.names.map((name) => ({
    name,
    points: run.history
      .filter((entry) => typeof entry.val_losses?.[name] === "number")
      .map((entry) => ({ x: entry.epoch, y: entry.val_losses[name] })),
  }));
}

/** Weight per model per epoch: 1.0 at the start (x = 0), then the weight set after each epoch. */
export function weightSeries(run) {
  return run.names.map((name) => {
    const points = [{ x: 0, y: 1 }];
    for (const entry of run.history) {
      const weight = entry.weights?.[name];
      if (typeof weight === "number") points.push({ x: entry.epoch, y: weight });
    }
    return { name, points: run.history.length ? points : [] };
  });
}
