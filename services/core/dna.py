"""The DNA fingerprint of a certified run: what was trained on what, with what result.

Pure hashing over files and JSON; `oneseek_dna.json` is its on-disk form.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.core.atomic import canonical_json, json_bytes, write_json_atomic
from services.core.errors import InvalidInput, NotFound
from services.core.layout import ADAPTERS_DIR, DNA_FILE, LIVE_METRICS_FILE, RESULTS_FILE
from services.core.training_config import RUN_ID_RE

DNA_VERSION = "dna-v2"
# The two JSON artifacts the trainer writes before the DNA; their bytes are hashed as written.
ARTIFACT_FILES = (LIVE_METRICS_FILE, RESULTS_FILE)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")

_CHUNK = 1 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks so multi-GB weights fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """Every regular file under `root`: posix path relative to `root` -> sha256, sorted by path.

    Symlinks and special files are refused: a link could make the certified bytes live
    outside the run folder and change without the folder changing.
    """
    root = Path(root)
    try:
        root_stat = os.lstat(root)
    except FileNotFoundError:
        raise NotFound(f"Folder {root} does not exist.", field="path") from None
    if stat.S_ISLNK(root_stat.st_mode) or not stat.S_ISDIR(root_stat.st_mode):
        raise InvalidInput(f"{root} must be a real folder (not a symlink or a file).", field="path")
    hashes: dict[str, str] = {}
    pending = [root]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.is_symlink():
                    raise InvalidInput(
                        f"{path} is a symlink; a certified folder holds only regular files "
                        "and folders.",
                        field="path",
                    )
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif entry.is_file(follow_symlinks=False):
                    hashes[path.relative_to(root).as_posix()] = sha256_file(path)
                else:
                    raise InvalidInput(
                        f"{path} is not a regular file (device, socket or pipe); a certified "
                        "folder holds only regular files and folders.",
                        field="path",
                    )
    return dict(sorted(hashes.items()))


def model_fingerprint(name: str, model_dir: Path, architecture: str) -> dict[str, Any]:
    """A base model's identity: sha256 of its config.json and of each weight file."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        raise NotFound(
            f"Base model {name!r} has no config.json in {model_dir}; a base model folder "
            "holds config.json, weights and tokenizer files.",
            field="base_models",
        )
    weights = weight_files(model_dir)
    if not weights:
        raise NotFound(
            f"Base model {name!r} has no weight files in {model_dir}; expected *.safetensors "
            "or pytorch_model*.bin.",
            field="base_models",
        )
    return {
        "name": name,
        "architecture": architecture,
        "config_sha256": sha256_file(config),
        "weights": {path.name: sha256_file(path) for path in weights},
    }


def weight_files(model_dir: Path) -> list[Path]:
    """The files of a checkpoint that hold its weights (top level, sorted by name)."""
    found = {
        path
        for pattern in WEIGHT_PATTERNS
        for path in Path(model_dir).glob(pattern)
        if path.is_file()
    }
    return sorted(found)


def adapter_hashes(adapters_dir: Path) -> dict[str, dict[str, str]]:
    """`{model: {relative path: sha256}}` for each model folder under `adapters/`."""
    adapters_dir = Path(adapters_dir)
    flat = hash_tree(adapters_dir)
    grouped: dict[str, dict[str, str]] = {}
    for relpath, digest in flat.items():
        model, sep, inner = relpath.partition("/")
        if not sep:
            raise InvalidInput(
                f"{adapters_dir / relpath} lies outside a model folder; adapters/ holds one "
                "folder per model (adapters/<model>/...).",
                field="adapters",
            )
        grouped.setdefault(model, {})[inner] = digest
    return dict(sorted(grouped.items()))


def build_dna(
    *,
    run_id: str,
    created_at: str,
    base_models: list[dict[str, Any]],
    dataset: dict[str, Any],
    run_dir: Path,
    final_weights: dict[str, float],
    training_config: dict[str, Any],
    model_signing: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Hash the run folder's adapters and artifacts and compose the DNA document.

    `model_signing`: the OpenSSF model-signing files (run folder path -> sha256: each adapter's
    signature and the public key), recorded so the proof covers them; they are left out of the
    `dna` string, which says what was trained (ECDSA signatures differ on every signing).
    The values are passed through JSON first, so the hashes are computed over exactly what
    a reader of `oneseek_dna.json` gets back.
    """
    if not isinstance(run_id, str) or RUN_ID_RE.fullmatch(run_id) is None:
        raise InvalidInput(
            f"run_id {run_id!r} is malformed; run ids look like run-YYYYMMDD-HHMMSS "
            "(optionally -N).",
            field="run_id",
        )
    for model, weight in final_weights.items():
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise InvalidInput(
                f"final_weights[{model!r}] is {weight!r}; weights must be finite numbers.",
                field="final_weights",
            )
    run_dir = Path(run_dir)
    adapters_dir = run_dir / ADAPTERS_DIR
    if not adapters_dir.is_dir():
        raise NotFound(
            f"{adapters_dir} does not exist; the trainer writes adapters/<model>/ before the DNA.",
            field="run_dir",
        )
    artifacts: dict[str, str] = {}
    for name in ARTIFACT_FILES:
        path = run_dir / name
        if not path.is_file():
            raise NotFound(
                f"{path} does not exist; the trainer writes it before the DNA.", field="run_dir"
            )
        artifacts[name] = sha256_file(path)

    doc: dict[str, Any] = {
        "version": DNA_VERSION,
        "run_id": run_id,
        "created_at": created_at,
        "base_models": _as_json(base_models, "base_models"),
        "dataset": _as_json(dataset, "dataset"),
        "adapters": adapter_hashes(adapters_dir),
        "artifacts": artifacts,
        "final_weights": _as_json(final_weights, "final_weights"),
        "training_config": _as_json(training_config, "training_config"),
    }
    if model_signing is not None:
        doc["model_signing"] = dict(sorted(model_signing.items()))
    doc["dna"] = compute_dna_string(doc)
    doc["immutable_hash"] = compute_immutable_hash(doc)
    return doc


def compute_dna_string(doc: Mapping[str, Any]) -> str:
    """`dna-v2:<32 hex>` over base model hashes, dataset hash, adapters, weights and config.

    Run id, timestamps and the metric files are left out on purpose: the same training on
    the same inputs with the same outcome has the same DNA. Base models are taken in name
    order, so the order they were selected in does not matter.
    """
    base_models = doc.get("base_models")
    dataset = doc.get("dataset")
    if not isinstance(base_models, list) or not all(isinstance(m, dict) for m in base_models):
        raise InvalidInput("base_models must be a list of model fingerprints.", field="base_models")
    if not isinstance(dataset, Mapping) or not isinstance(dataset.get("sha256"), str):
        raise InvalidInput("dataset must be an object with a sha256 field.", field="dataset")
    if not _SHA256_HEX.match(dataset["sha256"]):
        raise InvalidInput(
            f"dataset.sha256 {dataset['sha256']!r} is not 64 lowercase hex digits.",
            field="dataset.sha256",
        )
    models = []
    for model in base_models:
        missing = [key for key in ("name", "config_sha256", "weights") if key not in model]
        if missing:
            raise InvalidInput(
                f"base model entry {model.get('name', model)!r} lacks {', '.join(missing)}; "
                "build it with model_fingerprint().",
                field="base_models",
            )
        if not isinstance(model["name"], str):
            raise InvalidInput("base model names must be strings.", field="base_models")
        models.append(
            {
                "name": model["name"],
                "config_sha256": model["config_sha256"],
                "weights": model["weights"],
            }
        )
    models.sort(key=lambda m: str(m["name"]))
    basis = {
        "base_models": models,
        "dataset_sha256": dataset["sha256"],
        "adapters": doc.get("adapters"),
        "final_weights": doc.get("final_weights"),
        "training_config": doc.get("training_config"),
    }
    return f"{DNA_VERSION}:{hashlib.sha256(_canonical(basis, 'dna')).hexdigest()[:32]}"


def compute_immutable_hash(doc: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of every field but `immutable_hash` itself."""
    rest = {key: value for key, value in doc.items() if key != "immutable_hash"}
    return hashlib.sha256(_canonical(rest, "immutable_hash")).hexdigest()


def write_dna(run_dir: Path, doc: Mapping[str, Any]) -> Path:
    """Write `oneseek_dna.json` atomically, refusing a document whose hashes do not match it."""
    if doc.get("dna") != compute_dna_string(doc):
        raise InvalidInput(
            "The DNA document's dna string does not match its content; build it with build_dna().",
            field="dna",
        )
    if doc.get("immutable_hash") != compute_immutable_hash(doc):
        raise InvalidInput(
            "The DNA document's immutable_hash does not match its content; build it with "
            "build_dna().",
            field="immutable_hash",
        )
    path = Path(run_dir) / DNA_FILE
    write_json_atomic(path, dict(doc))
    return path


def _canonical(value: Any, field: str) -> bytes:
    try:
        return canonical_json(value)
    except (TypeError, ValueError) as error:
        raise InvalidInput(
            f"{field} cannot be hashed as JSON ({error}); use strings, finite numbers, lists "
            "and objects with string keys.",
            field=field,
        ) from None


def _as_json(value: Any, field: str) -> Any:
    # Round-trip through the on-disk form so tuples, int keys and the like hash the way
    # they read back.
    try:
        return json.loads(json_bytes(value))
    except (TypeError, ValueError) as error:
        raise InvalidInput(
            f"{field} cannot be written as JSON ({error}); use strings, finite numbers, lists "
            "and objects with string keys.",
            field=field,
        ) from None
