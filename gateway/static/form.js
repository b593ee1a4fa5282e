// The "New run" form: defaults and limits come from /api/config (none are written here), the
// body goes out camelCase, and the server's {"message", "field"} is shown beside that field.

import { formatCount } from "./format.js";

/** Request field -> where its default (and limit) live in /api/config. */
const NUMBER_FIELDS = {
  epochs: { default: ["defaults", "epochs"], min: 1, max: ["limits", "max_epochs"], integer: true },
  learningRate: { default: ["defaults", "learning_rate"], min: 0 },
  batchSize: {
    default: ["defaults", "batch_size"],
    min: 1,
    max: ["limits", "max_batch_size"],
    integer: true,
  },
  seed: { default: ["defaults", "seed"], min: 0, integer: true },
  loraRank: {
    default: ["defaults", "lora_rank"],
    min: 1,
    max: ["limits", "max_lora_rank"],
    integer: true,
  },
  autoStopThreshold: { default: ["confidence_auto_stop", "threshold"], min: 0 },
  autoStopPatience: { default: ["confidence_auto_stop", "patience"], min: 1, integer: true },
  minEpochs: { default: ["confidence_auto_stop", "min_epochs"], min: 1, integer: true },
};

const FIELD_NAMES = ["datasetId", "baseModels", "method", ...Object.keys(NUMBER_FIELDS)];

function lookup(config, path) {
  return path.reduce(
    (node, key) => (node && typeof node === "object" ? node[key] : undefined),
    config,
  );
}

export class TrainingForm {
  constructor(form, { onSubmit }) {
    this.form = form;
    this.onSubmit = onSubmit;
    this.maxModels = Infinity;
    this.dataset = form.querySelector("#datasetId");
    this.modelsList = form.querySelector("#models-list");
    this.modelsCount = form.querySelector("#models-count");
    this.method = form.querySelector("#method");
    this.formError = form.querySelector("#form-error");
    this.submitButton = form.querySelector("#start-button");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    form.addEventListener("input", (event) =>
      this.clearError(event.target.name || event.target.id),
    );
    this.method.addEventListener("change", () => this.syncMethod());
    this.modelsList.addEventListener("change", () => this.syncModels());
  }

  /** Defaults, limits and hints from the gateway's training config. */
  applyConfig(config) {
    // the server enforces the limit in any case; without it here, the page just does not
    this.maxModels = lookup(config, ["limits", "max_models"]) ?? Infinity;
    for (const [name, spec] of Object.entries(NUMBER_FIELDS)) {
      const input = this.form.querySelector(`#${name}`);
      const value = lookup(config, spec.default);
      const max = spec.max ? lookup(config, spec.max) : undefined;
      input.min = String(spec.min);
      if (max !== undefined) input.max = String(max);
      input.step = spec.integer ? "1" : "any";
      if (value !== undefined && value !== null) {
        input.value = String(value);
        input.placeholder = String(value);
        input.dataset.default = String(value);
      }
      const hint = this.form.querySelector(`#${name}-hint`);
      if (hint) {
        if (max !== undefined) hint.textContent = `${spec.min}–${max}`;
        else if (name === "learningRate") hint.textContent = "> 0";
        else hint.textContent = `≥ ${spec.min}`;
      }
    }
    const method = lookup(config, ["defaults", "method"]);
    if (method) this.method.value = method;
    const autoStop = config?.confidence_auto_stop;
    const note = this.form.querySelector("#auto-stop-note");
    if (note && autoStop && autoStop.enabled === false) {
      note.textContent = "Auto-stop is switched off in the server's config: runs use every epoch.";
      note.hidden = false;
    }
    const upTo = Number.isFinite(this.maxModels) ? ` to ${this.maxModels}` : " or more";
    this.form.querySelector("#baseModels-help").textContent =
      `Pick 1${upTo}; every one trains on the same data, side by side.`;
    this.syncMethod();
    this.syncModels();
  }

  /** Fill the dataset select and the model picker; keeps what was chosen when still there. */
  setCatalog({ models, datasets }) {
    const chosenDataset = this.dataset.value;
    const options = datasets.map((dataset) => {
      const option = document.createElement("option");
      option.value = dataset.id;
      const records = typeof dataset.records === "number" ? ` (${dataset.records} records)` : "";
      option.textContent = `${dataset.id}${records}`;
      return option;
    });
    const placeholder = document.createElement("option");
    placeholder.value = "";
    placeholder.textContent = datasets.length ? "Choose a dataset…" : "No dataset in DATASETS_DIR";
    this.dataset.replaceChildren(placeholder, ...options);
    if (datasets.some((d) => d.id === chosenDataset)) this.dataset.value = chosenDataset;
    else if (datasets.length === 1) this.dataset.value = datasets[0].id;
    this.dataset.disabled = false;

    const chosen = new Set(this.selectedModels());
    const items = models.map((model) => {
      const label = document.createElement("label");
      label.className = "model-option";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.name = "baseModels";
      box.value = model.name;
      box.checked = chosen.has(model.name);
      const text = document.createElement("span");
      text.className = "model-option-text";
      const name = document.createElement("span");
      name.className = "model-option-name";
      name.textContent = model.name;
      const meta = document.createElement("span");
      meta.className = "model-option-meta";
      const parts = [model.architecture || model.model_type || "unknown architecture"];
      if (typeof model.parameter_count === "number" && model.parameter_count > 0) {
        parts.push(`${formatCount(model.parameter_count)} params`);
      }
      meta.textContent = parts.join(" · ");
      text.append(name, meta);
      label.append(box, text);
      return label;
    });
    if (!items.length) {
      const empty = document.createElement("p");
      empty.className = "empty";
      empty.textContent =
        "No base model in MODELS_DIR. Run `oneseek demo-assets` to create tiny ones.";
      items.push(empty);
    }
    this.modelsList.replaceChildren(...items);
    this.syncModels();
    this.setEnabled(true);
  }

  /** Before a token is known (or when it was refused): say what is missing. */
  showLocked(message) {
    const note = document.createElement("p");
    note.className = "empty";
    note.textContent = message;
    this.modelsList.replaceChildren(note);
    const placeholder = document.createElement("option");
    placeholder.value = "";
    placeholder.textContent = "Enter the admin token first";
    this.dataset.replaceChildren(placeholder);
    this.dataset.disabled = true;
    this.syncModels();
    this.setEnabled(false);
  }

  setEnabled(enabled) {
    this.submitButton.disabled = !enabled;
  }

  selectedModels() {
    return [...this.modelsList.querySelectorAll('input[name="baseModels"]:checked')].map(
      (box) => box.value,
    );
  }

  syncModels() {
    const boxes = [...this.modelsList.querySelectorAll('input[name="baseModels"]')];
    const count = boxes.filter((box) => box.checked).length;
    const full = count >= this.maxModels;
    for (const box of boxes) box.disabled = full && !box.checked;
    this.modelsCount.textContent = Number.isFinite(this.maxModels)
      ? `${count} of ${this.maxModels} max`
      : `${count} selected`;
    this.modelsCount.classList.toggle("is-full", full);
    if (count) this.clearError("baseModels");
  }

  syncMethod() {
    const rank = this.form.querySelector("#loraRank");
    rank.disabled = this.method.value !== "lora";
  }

  /** The camelCase start body; null (with the field marked) when an input is not a number. */
  collect() {
    const body = {
      datasetId: this.dataset.value || null,
      baseModels: this.selectedModels(),
      method: this.method.value,
    };
    let valid = true;
    for (const name of Object.keys(NUMBER_FIELDS)) {
      const input = this.form.querySelector(`#${name}`);
      if (input.disabled) continue;
      if (input.validity.badInput) {
        this.showFieldError(name, "Enter a number here.");
        valid = false;
        continue;
      }
      // empty: the server's default applies (shown as the placeholder)
      if (input.value.trim() !== "") body[name] = Number(input.value);
    }
    if (body.datasetId === null) delete body.datasetId; // the server names what is missing
    return valid ? body : null;
  }

  async submit() {
    this.clearErrors();
    const body = this.collect();
    if (body === null) {
      this.focusFirstError();
      return;
    }
    this.submitButton.disabled = true;
    this.submitButton.classList.add("is-busy");
    try {
      await this.onSubmit(body);
    } catch (error) {
      this.showError(error);
    } finally {
      this.submitButton.disabled = false;
      this.submitButton.classList.remove("is-busy");
    }
  }

  /** An ApiError: beside its field when the form has one, else above the Start button. */
  showError(error) {
    const field = error?.field;
    if (field && FIELD_NAMES.includes(field)) {
      this.showFieldError(field, error.message);
      this.focusFirstError();
    } else {
      this.formError.textContent = error?.message || "The run could not be started.";
      this.formError.hidden = false;
    }
  }

  showFieldError(field, message) {
    const target = this.form.querySelector(`#${field}-error`);
    if (!target) return;
    target.textContent = message;
    target.hidden = false;
    const control = this.fieldControl(field);
    control?.setAttribute("aria-invalid", "true");
    control?.closest(".field, fieldset")?.classList.add("has-error");
  }

  fieldControl(field) {
    if (field === "baseModels") return this.form.querySelector("#models-fieldset");
    return this.form.querySelector(`#${field}`);
  }

  focusFirstError() {
    const invalid = this.form.querySelector('[aria-invalid="true"]');
    if (!invalid) return;
    const target =
      invalid.tagName === "FIELDSET" ? invalid.querySelector("input:not(:disabled)") : invalid;
    target?.focus();
  }

  clearError(field) {
    if (!field || !FIELD_NAMES.includes(field)) return;
    const target = this.form.querySelector(`#${field}-error`);
    if (target) {
      target.hidden = true;
      target.textContent = "";
    }
    const control = this.fieldControl(field);
    control?.removeAttribute("aria-invalid");
    control?.closest(".field, fieldset")?.classList.remove("has-error");
  }

  clearErrors() {
    for (const field of FIELD_NAMES) this.clearError(field);
    this.formError.hidden = true;
    this.formError.textContent = "";
  }
}
