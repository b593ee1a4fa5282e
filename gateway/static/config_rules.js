// Run ids and the base-model check of services/core/training_config.py, in JavaScript: the same
// ids and the same refusals, word for word. The gateway serves this module with the server's
// TRAINING_CONFIG bound to it as /static/trainingConfig.js (gateway/page.py); the tests run both
// under Node against the Python functions.

/** `value` frozen all the way down, like Python's read-only TRAINING_CONFIG. */
export function deepFreeze(value) {
  if (value && typeof value === "object") {
    for (const item of Object.values(value)) deepFreeze(item);
    Object.freeze(value);
  }
  return value;
}

/** How Python's repr() shows a JSON value, so messages read exactly as the server's. */
export function pyRepr(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value); // JSON has no NaN or infinity
  if (typeof value === "string") {
    const quote = value.includes("'") && !value.includes('"') ? '"' : "'";
    const body = value.replaceAll("\\", "\\\\").replaceAll(quote, `\\${quote}`);
    return quote + body.replaceAll("\n", "\\n").replaceAll("\t", "\\t") + quote;
  }
  if (Array.isArray(value)) return `[${value.map(pyRepr).join(", ")}]`;
  const items = Object.entries(value).map(([key, item]) => `${pyRepr(key)}: ${pyRepr(item)}`);
  return `{${items.join(", ")}}`;
}

/** Python's strftime for the directives a run id may use, in UTC. */
function utcStrftime(date, format) {
  const pad = (number, width = 2) => String(number).padStart(width, "0");
  const fields = {
    Y: String(date.getUTCFullYear()),
    m: pad(date.getUTCMonth() + 1),
    d: pad(date.getUTCDate()),
    H: pad(date.getUTCHours()),
    M: pad(date.getUTCMinutes()),
    S: pad(date.getUTCSeconds()),
    "%": "%",
  };
  return format.replace(/%(.)/g, (whole, directive) => {
    if (!(directive in fields)) throw new Error(`Unsupported strftime directive ${whole}`);
    return fields[directive];
  });
}

/** The `field` an error is about, as the gateway's error answers name it. */
function invalid(message, field, kind = "invalid_input") {
  const error = new Error(message);
  error.field = field;
  error.kind = kind;
  return error;
}

/**
 * generateRunId and validateBaseModels bound to a TRAINING_CONFIG and the model-name rule.
 * `namePattern` is the Python MODEL_NAME_RE; `nameRule` the sentence that explains it.
 */
export function makeRules(config, namePattern, nameRule) {
  const { metadata, limits } = config;
  const namePatternRe = new RegExp(namePattern);

  /** `run-YYYYMMDD-HHMMSS` in UTC; when `exists` says it is taken, `-2`, `-3`, ... follow. */
  function generateRunId(now = new Date(), exists = () => false) {
    const stamp = utcStrftime(now, metadata.timestamp_format);
    const base = metadata.naming_pattern.replace("{timestamp}", stamp);
    if (!exists(base)) return base;
    for (let suffix = 2; suffix < 100_000; suffix += 1) {
      const candidate = `${base}-${suffix}`;
      if (!exists(candidate)) return candidate;
    }
    throw new Error(`Could not find a free run id for ${base}: every suffix up to -99999 exists.`);
  }

  function validName(name) {
    return typeof name === "string" && namePatternRe.test(name) && !name.includes("..");
  }

  /** 1 to limits.max_models distinct valid names (each in `available`, when given); throws an
   * Error whose `field` is "baseModels" otherwise. There is no default model. */
  function validateBaseModels(names, available = undefined) {
    const field = "baseModels";
    if (names === null || names === undefined) throw invalid("No base models selected", field);
    if (!Array.isArray(names)) {
      throw invalid(`baseModels must be a list of model names, got ${pyRepr(names)}.`, field);
    }
    if (names.length === 0) throw invalid("No base models selected", field);
    if (names.length > limits.max_models) {
      throw invalid(
        `Too many base models: ${names.length} selected, at most ${limits.max_models} are allowed.`,
        field,
      );
    }
    const checked = [];
    for (const name of names) {
      if (!validName(name)) {
        throw invalid(`Model name ${pyRepr(name)} is not valid: ${nameRule}.`, field);
      }
      if (checked.includes(name)) {
        throw invalid(
          `Base model ${pyRepr(name)} is selected twice; select each model once.`,
          field,
        );
      }
      checked.push(name);
    }
    if (available !== undefined) {
      for (const name of checked) {
        if (!available.includes(name)) {
          const listed = [...available].sort().join(", ") || "none (run `oneseek demo-assets`)";
          throw invalid(
            `Base model ${pyRepr(name)} was not found in MODELS_DIR; available: ${listed}.`,
            field,
            "not_found",
          );
        }
      }
    }
    return checked;
  }

  return { generateRunId, validateBaseModels };
}
