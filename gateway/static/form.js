// The "New run" form: its fields are drawn from the start options of /api/config (label, help,
// limits, default: none are written here), the body goes out camelCase, and the server's
// {"message", "field"} is shown beside that field.

import { element } from "./dom.js";
import { formatCount } from "./format.js";
import { validateBaseModels } from "./trainingConfig.js";

/** Options the page draws itself (the dataset select, the model picker), not from the list. */
const OWN_FIELDS = ["datasetId", "baseModels"];
/** One option's field: label, control, limit hint and error line, ids as the errors name them
 * (after `prefix`, for a second form on the page with an option of the same name). */
export function drawField(option, prefix = "") {
  const { schema } = option;
  const name = `${prefix}${option.name}`;
  const checkbox = schema.type === "boolean";
  const field = element("div", checkbox ? "field field-check" : "field");
  field.dataset.field = option.name;
  const label = element("label", "label", option.label);
  label.htmlFor = name;
  let control;
  if (option.choices.length) {
    control = element("select");
    for (const choice of option.choices) {
      const item = element("option", "", choice.label);
      item.value = choice.value;
      control.append(item);
    }
  } else if (checkbox) {
    control = element("input");
    control.type = "checkbox";
  } else {
    control = element("input");
    control.type = "number";
    control.inputMode = schema.type === "integer" ? "numeric" : "decimal";
    control.step = schema.type === "integer" ? "1" : "any";
    const low = schema.minimum ?? schema.exclusiveMinimum;
    const high = schema.maximum ?? schema.exclusiveMaximum;
    if (low !== undefined) control.min = String(low);
    if (high !== undefined) control.max = String(high);
  }
  control.id = name;
  control.name = option.name;
  control.title = option.help;
  control.setAttribute("aria-describedby", `${name}-hint ${name}-error`);
  if (option.default !== null && option.default !== undefined) {
    if (control.type === "checkbox") control.checked = option.default === true;
    else control.value = String(option.default);
    if (control.type === "number") control.placeholder = String(option.default);
  }
  const hint = element("span", "hint", option.hint);
  hint.id = `${name}-hint`;
  const error = element("p", "field-error");
  error.id = `${name}-error`;
  error.hidden = true;
  field.append(...(checkbox ? [control, label] : [label, control]), hint, error);
  return field;
}

export class TrainingForm {
  constructor(form, { onSubmit }) {
    this.form = form;
    this.onSubmit = onSubmit;
    this.maxModels = Infinity;
    this.dataset = form.querySelector("#datasetId");
    this.modelsList = form.querySelector("#models-list");
    this.modelsCount = form.querySelector("#models-count");
    this.options = [];
    this.formError = form.querySelector("#form-error");
    this.submitButton = form.querySelector("#start-button");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    form.addEventListener("input", (event) =>
      this.clearError(event.target.name || event.target.id),
    );
    form.addEventListener("change", () => this.syncConditions());
    this.modelsList.addEventListener("change", () => this.syncModels());
  }

  /** The fields of every start option, with their defaults, limits and hints, from the
   * gateway's training config. */
  applyConfig(config) {
    // the server enforces the limit in any case; without it here, the page just does not
    this.maxModels = config?.limits?.max_models ?? Infinity;
    this.options = (config?.start_options ?? []).filter((o) => !OWN_FIELDS.includes(o.name));
    for (const group of this.form.querySelectorAll("[data-group]")) {
      const fields = this.options.filter((option) => option.group === group.dataset.group);
      group.replaceChildren(...fields.map((option) => drawField(option)));
      group.closest(".group").hidden = fields.length === 0;
    }
    const autoStop = config?.confidence_auto_stop;
    const note = this.form.querySelector("#auto-stop-note");
    if (note && autoStop && autoStop.enabled === false) {
      note.textContent = "Auto-stop is switched off in the server's config: runs use every epoch.";
      note.hidden = false;
    }
    const upTo = Number.isFinite(this.maxModels) ? ` to ${this.maxModels}` : " or more";
    this.form.querySelector("#baseModels-help").textContent =
      `Pick 1${upTo}; every one trains on the same data, side by side.`;
    this.syncConditions();
    this.syncModels();
  }

  /** Fill the dataset select and the model picker; keeps what was chosen when still there. */
  setCatalog({ models, datasets }) {
    const chosenDataset = this.dataset.value;
    const options = datasets.map((dataset) => {
      const records = typeof dataset.records === "number" ? ` (${dataset.records} records)` : "";
      const option = element("option", "", `${dataset.id}${records}`);
      option.value = dataset.id;
      return option;
    });
    const placeholder = element(
      "option",
      "",
      datasets.length ? "Choose a dataset…" : "No dataset in DATASETS_DIR",
    );
    placeholder.value = "";
    this.dataset.replaceChildren(placeholder, ...options);
    if (datasets.some((d) => d.id === chosenDataset)) this.dataset.value = chosenDataset;
    else if (datasets.length === 1) this.dataset.value = datasets[0].id;
    this.dataset.disabled = false;

    const chosen = new Set(this.selectedModels());
    const items = models.map((model) => {
      const label = element("label", "model-option");
      const box = element("input");
      box.type = "checkbox";
      box.name = "baseModels";
      box.value = model.name;
      box.checked = chosen.has(model.name);
      const text = element("span", "model-option-text");
      const name = element("span", "model-option-name", model.name);
      const meta = element("span", "model-option-meta");
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
      const hint = "No base model in MODELS_DIR. Run `oneseek demo-assets` to create tiny ones.";
      items.push(element("p", "empty", hint));
    }
    this.modelsList.replaceChildren(...items);
    this.syncModels();
    this.setEnabled(true);
  }

  /** Before a token is known (or when it was refused): say what is missing. */
  showLocked(message) {
    this.modelsList.replaceChildren(element("p", "empty", message));
    const placeholder = element("option", "", "Enter the admin token first");
    placeholder.value = "";
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

  /** An option that only means something while others have given values (LoRA's settings
   * with the LoRA method) is disabled, and left out of the body, otherwise. */
  syncConditions() {
    for (const option of this.options) {
      const control = this.form.querySelector(`#${option.name}`);
      control.disabled = Object.entries(option.when ?? {}).some(
        ([other, value]) => this.form.querySelector(`#${other}`)?.value !== value,
      );
    }
  }

  /** The camelCase start body; null (with the field marked) when an input is not valid. */
  collect() {
    const body = { datasetId: this.dataset.value || null, baseModels: this.selectedModels() };
    let valid = true;
    try {
      validateBaseModels(body.baseModels); // the server's own rule and words, without a trip
    } catch (error) {
      this.showFieldError("baseModels", error.message);
      valid = false;
    }
    for (const option of this.options) {
      const control = this.form.querySelector(`#${option.name}`);
      if (control.disabled) continue;
      if (control.tagName === "SELECT") body[option.name] = control.value;
      else if (control.type === "checkbox") body[option.name] = control.checked;
      else if (control.validity.badInput) {
        this.showFieldError(option.name, "Enter a number here.");
        valid = false;
      } else if (control.value.trim() !== "") {
        // empty: the server's default applies (shown as the placeholder)
        body[option.name] = Number(control.value);
      }
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
    if (field && this.fieldNames().includes(field)) {
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

  fieldNames() {
    return [...OWN_FIELDS, ...this.options.map((option) => option.name)];
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
    if (!field || !this.fieldNames().includes(field)) return;
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
    for (const field of this.fieldNames()) this.clearError(field);
    this.formError.hidden = true;
    this.formError.textContent = "";
  }
}
