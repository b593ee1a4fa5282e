"""Where the suite keeps things: its own state folder, and the names inside a run folder
(README: the certified run folder). Names and paths only: nothing here touches the disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.core.training_config import TRAINING_CONFIG

CERTIFIED_DIR = str(TRAINING_CONFIG["metadata"]["certified_dir"])

# ---- inside `$MODELS_DIR/oneseek-certified/<runId>/` ----------------------------------------
MANIFEST_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
LIVE_METRICS_FILE = "live_metrics.json"
RESULTS_FILE = "training_results.json"
DNA_FILE = "oneseek_dna.json"
PROOF_FILE = "ledger_proof.json"
ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
"""TensorBoard event files: `models/<model>/` per model and `population/` (a log, like
events.jsonl: outside the certificate, rebuilt from events.jsonl when a run resumes)."""
MODEL_SIGNATURES_DIR = "model_signatures"
"""`<model>.sig`: each adapter folder's OpenSSF model-signing signature (covered by the DNA)."""
MODEL_SIGNING_PUBLIC_KEY_FILE = "model_signing_public_key.pem"
"""The EC public key (PEM) those signatures verify with (covered by the DNA)."""

ARTIFACTS = (LIVE_METRICS_FILE, RESULTS_FILE, DNA_FILE, PROOF_FILE)
"""The run folder's JSON files a client may fetch (GetArtifact, GET …/artifacts/{name})."""
LOGS = (MANIFEST_FILE, EVENTS_FILE, TENSORBOARD_DIR)
"""What a run folder holds beside its certificate: records of the run, never certified."""

# ---- inside an exported model folder (`oneseek export`) ---------------------------------------
EXPORT_MANIFEST_FILE = "oneseek_export.json"
EXPORT_FORMAT = "oneseek-export-v1"
"""The manifest's `format`: what `oneseek verify` knows how to check."""
EXPORT_SIGNATURE_FILE = "model.sig"
"""The export folder's OpenSSF model-signing signature (the stock command's default name); it
signs every file but itself and the manifest, which lists it and the public key in turn."""


def models_dir(given: str | Path | None = None) -> Path:
    """Base models (`<name>/` folders) and, inside, the run folders: `given` (a flag), else
    $MODELS_DIR, else ./models."""
    return Path(given or os.environ.get("MODELS_DIR") or "models")


def datasets_dir(given: str | Path | None = None) -> Path:
    """Datasets (`<id>.jsonl`): `given` (a flag), else $DATASETS_DIR, else ./datasets."""
    return Path(given or os.environ.get("DATASETS_DIR") or "datasets")


def state_dir() -> Path:
    """The suite's own state (keys, database, journal, token): $ONESEEK_STATE_DIR or ./var."""
    return Path(os.environ.get("ONESEEK_STATE_DIR") or "var")


def certified_root(models_root: Path) -> Path:
    """The folder every run folder lives in."""
    return Path(models_root) / CERTIFIED_DIR
