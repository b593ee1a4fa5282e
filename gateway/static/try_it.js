// The "Try it" panel of a finished run: the chosen models continue one prompt side by side, each
// answer streamed into its own column from POST /api/training/{runId}/generate as it is produced,
// with its figures when it is done. The options' fields, defaults and limits come from the
// generate options of /api/config, drawn as the start form draws its own.

import { ApiError, api, getToken } from "./api.js";
import { element } from "./dom.js";
import { drawField } from "./form.js";
import { DASH, formatCount, formatRate, formatSeconds, isNumber } from "./format.js";

/** Statuses whose run folder holds trained models to load. */
export const TRYABLE_STATUSES = new Set(["completed", "auto_stopped", "stopped"]);

const PREFIX = "try-";
const FINISH_REASONS = {
  length: "max new tokens",
  stop: "stop text",
  eos: "end of text",
  cancelled: "cancelled",
};

/** The stop text as typed, with \n, \r, \t and \\ read as the characters they name. */
export function unescapeStop(text) {
  const named = { n: "\n", r: "\r", t: "\t", "\\": "\\" };
  return text.replace(/\\([nrt\\])/g, (_, letter) => named[letter]);
}

/** One model's column: its state, its text as the pieces arrive, its figures when done. */
class Answer {
  constructor(name, index, color) {
    this.name = name;
    this.state = "waiting";
    this.started = null;
    this.node = element("article", "answer");
    this.node.dataset.model = name;
    this.node.style.setProperty("--series-color", color);
    const titleId = `${PREFIX}answer-${index}`;
    this.node.setAttribute("aria-labelledby", titleId);
    const head = element("header", "answer-head");
    const swatch = element("span", "model-swatch");
    swatch.setAttribute("aria-hidden", "true");
    const title = element("h3", "answer-model", name);
    title.id = titleId;
    this.badge = element("span", "tag answer-state");
    head.append(swatch, title, this.badge);
    this.meta = element("p", "answer-meta");
    // read out once the answer is whole (aria-busy holds the pieces back), not piece by piece
    this.text = element("div", "answer-text");
    this.text.setAttribute("aria-live", "polite");
    this.text.setAttribute("aria-busy", "true");
    this.text.setAttribute("aria-label", `Answer of ${name}`);
    this.text.setAttribute("role", "region");
    this.text.tabIndex = 0;
    this.textNode = document.createTextNode("");
    this.text.append(this.textNode);
    // a long answer scrolls in its box: it follows the newest text unless the reader scrolled up
    this.follow = true;
    this.scrollQueued = false;
    this.text.addEventListener("scroll", () => {
      const { scrollHeight, scrollTop, clientHeight } = this.text;
      this.follow = scrollHeight - scrollTop - clientHeight < 24;
    });
    this.message = element("p", "field-error answer-error");
    this.message.hidden = true;
    this.figures = element("dl", "answer-figures");
    this.cells = {};
    for (const [key, label] of [
      ["ttft", "First token"],
      ["rate", "Speed"],
      ["tokens", "Tokens"],
      ["finish", "Finished"],
      ["device", "Device"],
    ]) {
      const item = element("div", "answer-figure");
      item.dataset.figure = key;
      const value = element("dd", "num", DASH);
      item.append(element("dt", "", label), value);
      this.cells[key] = value;
      this.figures.append(item);
    }
    this.node.append(head, this.meta, this.text, this.message, this.figures);
    this.setState("waiting", "Loading…");
    this.meta.textContent = "Verifying and loading the model…";
  }

  setState(state, label) {
    this.state = state;
    this.node.dataset.state = state;
    this.badge.textContent = label;
    this.text.setAttribute("aria-busy", String(state === "waiting" || state === "streaming"));
  }

  get finished() {
    return this.state === "done" || this.state === "stopped" || this.state === "failed";
  }

  begin(data) {
    this.started = data;
    this.setState("streaming", "Generating…");
    const load = data.cached
      ? "from the cache"
      : isNumber(data.load_seconds)
        ? `loaded in ${formatSeconds(data.load_seconds)}`
        : "";
    this.meta.textContent = [load, `${data.prompt_tokens} prompt tokens`]
      .filter(Boolean)
      .join(" · ");
    const where = [data.device, data.precision].filter(Boolean).join(" · ");
    this.cells.device.textContent = where || DASH;
  }

  append(data) {
    if (this.state === "waiting") this.setState("streaming", "Generating…");
    if (typeof data.text === "string") this.textNode.appendData(data.text);
    if (isNumber(data.completion_tokens)) {
      this.cells.tokens.textContent = String(data.completion_tokens);
    }
    this.scrollToEnd();
  }

  /** Once a frame at most: pieces come faster than the screen redraws. */
  scrollToEnd() {
    if (!this.follow || this.scrollQueued) return;
    this.scrollQueued = true;
    window.requestAnimationFrame(() => {
      this.scrollQueued = false;
      if (this.follow) this.text.scrollTop = this.text.scrollHeight;
    });
  }

  finish(data) {
    // the summary's text is the whole answer: the pieces add up to it, unless one went missing
    if (typeof data.text === "string" && data.text !== this.textNode.data) {
      this.textNode.data = data.text;
      this.scrollToEnd();
    }
    const { ttft, rate, tokens } = this.cells;
    ttft.textContent = formatSeconds(data.time_to_first_token_seconds);
    ttft.title = `${data.time_to_first_token_seconds} s from the request, loading included`;
    rate.textContent = formatRate(data.tokens_per_second);
    rate.title = `${data.tokens_per_second} tokens per second over ${data.generation_seconds} s`;
    tokens.textContent = isNumber(data.completion_tokens) ? String(data.completion_tokens) : DASH;
    tokens.title = `${data.completion_tokens} generated after ${data.prompt_tokens} prompt tokens`;
    const reason = data.finish_reason;
    this.cells.finish.textContent = FINISH_REASONS[reason] ?? (reason || DASH);
    this.node.dataset.finishReason = reason ?? "";
    this.setState("done", reason === "cancelled" ? "Cancelled" : "Done");
  }

  stop() {
    if (this.finished) return;
    this.cells.finish.textContent = "stopped by you";
    this.setState("stopped", "Stopped");
  }

  fail(message) {
    if (this.finished) return;
    this.message.textContent = message;
    this.message.hidden = false;
    this.cells.finish.textContent = "error";
    this.setState("failed", "Failed");
  }
}

export class TryItPanel {
  constructor(root, { colorOf, announce, askForToken }) {
    this.root = root;
    this.colorOf = colorOf;
    this.announce = announce;
    this.askForToken = askForToken;
    this.form = root.querySelector("#try-form");
    this.locked = root.querySelector("#try-locked");
    this.prompt = root.querySelector("#try-prompt");
    this.stopText = root.querySelector("#try-stop");
    this.modelsList = root.querySelector("#try-models");
    this.modelsCount = root.querySelector("#try-models-count");
    this.error = root.querySelector("#try-error");
    this.generateButton = root.querySelector("#try-generate");
    this.cancelButton = root.querySelector("#try-cancel");
    this.status = root.querySelector("#try-status");
    this.answersBox = root.querySelector("#try-answers");
    this.downloads = root.querySelector("#try-downloads");
    this.downloadList = root.querySelector("#try-download-list");
    this.options = [];
    this.runId = null;
    this.modelsKey = "";
    this.best = null;
    this.picked = false; // once a person ticks a box, the best model no longer re-ticks itself
    this.controller = null;
    this.answers = new Map();

    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.generate();
    });
    this.form.addEventListener("input", (event) => this.clearError(event.target));
    this.modelsList.addEventListener("change", () => {
      this.picked = true;
      this.syncModels();
    });
    this.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        this.form.requestSubmit();
      }
    });
    this.root.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.controller) {
        event.preventDefault();
        this.cancel();
      }
    });
    this.cancelButton.addEventListener("click", () => this.cancel());
    root.querySelector("#try-token").addEventListener("click", () => this.askForToken());
  }

  /** The option fields, from /api/config's generate options (defaults and limits included). */
  applyConfig(config) {
    this.options = config?.generate_options ?? [];
    const grid = this.form.querySelector("[data-group='generation']");
    grid.replaceChildren(...this.options.map((option) => drawField(option, PREFIX)));
  }

  /**
   * Show the panel for the run on screen, or hide it: `run` is {runId, status, models:
   * [{name, architecture, parameter_count}], best}, or null.
   */
  show(run, { hasToken }) {
    const visible = Boolean(run) && TRYABLE_STATUSES.has(run.status) && run.models.length > 0;
    if (!visible || run.runId !== this.runId) this.reset(visible ? run.runId : null);
    this.root.hidden = !visible;
    if (!visible) return;
    this.locked.hidden = hasToken;
    this.form.hidden = !hasToken;
    this.answersBox.hidden = !hasToken || this.answers.size === 0;
    this.downloads.hidden = !hasToken;
    const key = JSON.stringify(run.models.map((model) => model.name));
    if (key !== this.modelsKey || run.best !== this.best) {
      this.modelsKey = key;
      this.best = run.best;
      this.drawModels(run.models);
    }
  }

  /** A different run (or none): stop what is generating, forget the last answers. */
  reset(runId) {
    this.abort();
    this.runId = runId;
    this.modelsKey = "";
    this.best = null;
    this.picked = false;
    this.answers.clear();
    this.answersBox.replaceChildren();
    this.answersBox.hidden = true;
    this.downloadList.replaceChildren();
    this.showError("");
    this.clearErrors();
    this.status.textContent = "";
  }

  drawModels(models) {
    const chosen = new Set(this.selectedModels());
    const items = models.map((model) => {
      const label = element("label", "model-option");
      const box = element("input");
      box.type = "checkbox";
      box.name = "models";
      box.value = model.name;
      box.checked = this.picked ? chosen.has(model.name) : model.name === this.best;
      const swatch = element("span", "model-swatch");
      swatch.setAttribute("aria-hidden", "true");
      swatch.style.setProperty("--series-color", this.colorOf(model.name));
      const text = element("span", "model-option-text");
      const name = element("span", "model-option-name", model.name);
      if (model.name === this.best) name.append(" ", element("span", "tag tag-best", "best"));
      const parts = [model.architecture || model.model_type || ""];
      if (isNumber(model.parameter_count) && model.parameter_count > 0) {
        parts.push(`${formatCount(model.parameter_count)} params`);
      }
      text.append(name, element("span", "model-option-meta", parts.filter(Boolean).join(" · ")));
      label.append(box, swatch, text);
      return label;
    });
    // no best model known (a stopped run before any epoch ended): the first one answers
    if (!this.picked && !models.some((model) => model.name === this.best) && items.length) {
      items[0].querySelector("input").checked = true;
    }
    this.modelsList.replaceChildren(...items);
    this.syncModels();
    this.drawDownloads(models);
  }

  /** Per model, links to its export: merged into the base, or the adapter alone. */
  drawDownloads(models) {
    const items = models.map((model) => {
      const item = element("li", "download-item");
      item.append(element("span", "download-model", model.name));
      for (const [merge, text] of [
        [true, "merged"],
        [false, "adapter"],
      ]) {
        const link = element("a", "btn btn-small download-link", text);
        link.setAttribute("download", "");
        link.dataset.model = model.name;
        link.dataset.merge = String(merge);
        link.setAttribute("aria-label", `Download ${model.name}, ${text}`);
        link.href = this.exportUrl(model.name, merge);
        // the token is read when the link is followed: it may have been entered since
        link.addEventListener("click", () => {
          link.href = this.exportUrl(model.name, merge);
        });
        item.append(link);
      }
      return item;
    });
    this.downloadList.replaceChildren(...items);
  }

  /** A link cannot send the Authorization header: the admin token goes as `?token=`. */
  exportUrl(model, merge) {
    const query = new URLSearchParams({ model, merge: String(merge) });
    const token = getToken();
    if (token) query.set("token", token);
    return `/api/admin/training/${encodeURIComponent(this.runId)}/export?${query}`;
  }

  selectedModels() {
    return [...this.modelsList.querySelectorAll("input[name='models']:checked")].map(
      (box) => box.value,
    );
  }

  syncModels() {
    const count = this.selectedModels().length;
    const total = this.modelsList.querySelectorAll("input[name='models']").length;
    this.modelsCount.textContent = `${count} of ${total}`;
    if (count) this.clearError(this.modelsList);
  }

  /** The camelCase body; null (with the field marked) when an input cannot be sent. */
  collect() {
    const body = { models: this.selectedModels(), prompt: this.prompt.value };
    let valid = true;
    if (!body.models.length) {
      this.showFieldError("models", "Pick at least one model to answer.");
      valid = false;
    }
    for (const option of this.options) {
      const control = this.form.querySelector(`#${PREFIX}${option.name}`);
      if (control.validity.badInput) {
        this.showFieldError(option.name, "Enter a number here.");
        valid = false;
      } else if (control.value.trim() !== "") {
        // empty: the server's default applies (shown as the placeholder)
        body[option.name] = Number(control.value);
      }
    }
    const stop = unescapeStop(this.stopText.value);
    if (stop) body.stop = [stop];
    return valid ? body : null;
  }

  async generate() {
    if (this.controller) return;
    this.showError("");
    this.clearErrors();
    const body = this.collect();
    if (body === null) {
      this.focusFirstError();
      return;
    }
    const runId = this.runId;
    const controller = new AbortController();
    this.controller = controller;
    this.setBusy(true);
    this.drawAnswers(body.models);
    const began = performance.now();
    const plural = body.models.length === 1 ? "" : "s";
    this.status.textContent = `Generating ${body.models.length} answer${plural}…`;
    let ended = false;
    try {
      await api.generate(runId, body, {
        signal: controller.signal,
        onEvent: (name, data) => {
          if (this.controller !== controller) return;
          if (name === "end") ended = true;
          else this.receive(name, data);
        },
      });
      if (this.controller !== controller) return;
      if (!ended) {
        this.failAll("The answer stream ended before the gateway said it was complete.");
        this.status.textContent = "Ended early.";
      } else {
        const seconds = (performance.now() - began) / 1000;
        const failed = [...this.answers.values()].some((answer) => answer.state === "failed");
        this.status.textContent = failed
          ? "Finished, with errors."
          : `Done in ${formatSeconds(seconds)}.`;
        this.announce(failed ? "Generation finished with errors." : "The answers are complete.");
      }
    } catch (error) {
      if (this.controller !== controller) return;
      if (error?.name === "AbortError") {
        for (const answer of this.answers.values()) answer.stop();
        this.status.textContent = "Stopped.";
        this.announce("Generation stopped.");
      } else if (error instanceof ApiError && !this.started()) {
        // refused before anything streamed: the request itself was wrong, or the moment
        this.answers.clear();
        this.answersBox.replaceChildren();
        this.answersBox.hidden = true;
        this.status.textContent = "";
        this.showRefusal(error);
      } else {
        this.failAll(error?.message ?? String(error));
        this.status.textContent = "Failed.";
      }
    } finally {
      if (this.controller === controller) {
        this.controller = null;
        this.setBusy(false);
      }
    }
  }

  started() {
    return [...this.answers.values()].some((answer) => answer.state !== "waiting");
  }

  receive(name, data) {
    const answer = this.answers.get(data.model);
    switch (name) {
      case "started":
        answer?.begin(data);
        break;
      case "token":
        answer?.append(data);
        break;
      case "done":
        answer?.finish(data);
        break;
      case "error":
        if (answer) answer.fail(data.message || "This model's answer failed.");
        else {
          this.showError(data.message || "Generation failed.");
          this.failAll("Not finished: see the error above.");
        }
        break;
      default:
      // an event this page does not know (a newer gateway's): nothing to show
    }
  }

  failAll(message) {
    for (const answer of this.answers.values()) answer.fail(message);
  }

  drawAnswers(models) {
    this.answers.clear();
    const columns = models.map((name, index) => {
      const answer = new Answer(name, index, this.colorOf(name));
      this.answers.set(name, answer);
      return answer.node;
    });
    this.answersBox.replaceChildren(...columns);
    this.answersBox.dataset.columns = String(Math.min(columns.length, 4));
    this.answersBox.hidden = false;
  }

  /** Stop button: abort the request; the gateway then cancels the generation. */
  cancel() {
    if (!this.controller) return;
    this.status.textContent = "Stopping…";
    this.controller.abort();
  }

  /** Quietly, for a run that leaves the screen. */
  abort() {
    const controller = this.controller;
    this.controller = null;
    controller?.abort();
    this.setBusy(false);
  }

  setBusy(busy) {
    const hadFocus = this.root.contains(document.activeElement);
    this.generateButton.disabled = busy;
    this.generateButton.classList.toggle("is-busy", busy);
    this.generateButton.setAttribute("aria-busy", String(busy));
    this.cancelButton.disabled = !busy;
    // a disabled button drops the focus: hand it to the one that now acts
    const lost = document.activeElement === document.body || document.activeElement?.disabled;
    if (hadFocus && lost) (busy ? this.cancelButton : this.generateButton).focus();
  }

  /** An ApiError before the stream: beside its field when the panel has one, else above. */
  showRefusal(error) {
    if (error.field && this.fieldControl(error.field)) {
      this.showFieldError(error.field, error.message);
      this.focusFirstError();
    } else {
      this.showError(error.message);
    }
  }

  showError(message) {
    this.error.textContent = message || "";
    this.error.hidden = !message;
  }

  fieldControl(field) {
    if (field === "models") return this.root.querySelector("#try-models-fieldset");
    if (field === "prompt" || field === "messages") return this.prompt;
    if (field === "stop") return this.stopText;
    return this.options.some((option) => option.name === field)
      ? this.root.querySelector(`#${PREFIX}${field}`)
      : null;
  }

  showFieldError(field, message) {
    const control = this.fieldControl(field);
    const name = field === "messages" ? "prompt" : field;
    const target = this.root.querySelector(`#${PREFIX}${name}-error`);
    if (!control || !target) {
      this.showError(message);
      return;
    }
    target.textContent = message;
    target.hidden = false;
    control.setAttribute("aria-invalid", "true");
    control.closest(".field, fieldset")?.classList.add("has-error");
  }

  /** The field an input event came from (or the model picker) is valid again until sent. */
  clearError(target) {
    const picker = target === this.modelsList || target?.name === "models";
    const control = picker ? this.fieldControl("models") : target;
    if (control?.getAttribute?.("aria-invalid") !== "true") return;
    control.removeAttribute("aria-invalid");
    const box = control.closest(".field, fieldset");
    box?.classList.remove("has-error");
    const error = box?.querySelector(".field-error");
    if (error) {
      error.hidden = true;
      error.textContent = "";
    }
  }

  clearErrors() {
    for (const control of this.root.querySelectorAll("[aria-invalid='true']")) {
      this.clearError(control);
    }
  }

  focusFirstError() {
    const invalid = this.root.querySelector("[aria-invalid='true']");
    const target =
      invalid?.tagName === "FIELDSET" ? invalid.querySelector("input:not(:disabled)") : invalid;
    target?.focus();
  }
}
