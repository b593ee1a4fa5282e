"""The certified run folder: `$MODELS_DIR/oneseek-certified/<runId>/`.

Adapters are written as whole folders swapped in atomically; every JSON file goes through
the atomic writer. `certify` writes the final files in the order the DNA needs them:
live_metrics.json, training_results.json, each adapter's OpenSSF model signature and their
public key, then oneseek_dna.json (which pins all of them) and ledger_proof.json.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from services.api import training_pb2
from services.api.codec import format_timestamp, now_timestamp, run_status_name
from services.api.run_config import RunConfig, config_from_dict, config_to_dict
from services.core.adaptive_weights import lr_multipliers
from services.core.atomic import replace_dir_atomic, write_bytes_atomic, write_json_atomic
from services.core.dna import build_dna, model_fingerprint, write_dna
from services.core.errors import ArtifactError, InvalidInput, OneSeekError
from services.core.layout import (
    ADAPTERS_DIR,
    LIVE_METRICS_FILE,
    MANIFEST_FILE,
    MODEL_SIGNATURES_DIR,
    MODEL_SIGNING_PUBLIC_KEY_FILE,
    RESULTS_FILE,
    TENSORBOARD_DIR,
)
from services.core.layout import certified_root as certified_root
from services.core.ledger import write_ledger_proof
from services.core.model_signatures import model_signer
from services.core.training_config import validate_run_id
from services.training.checkpoints import TrainingProgress
from services.training.models import BaseModelInfo

LOCK_FILE = ".worker.lock"
# live_metrics.json is a RunMetrics (GET /api/training/{runId}/metrics) without the history
LIVE_METRICS_KEYS = [
    f.name for f in training_pb2.RunMetrics.DESCRIPTOR.fields if f.name != "training_history"
]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iso_now() -> str:
    return format_timestamp(now_timestamp())  # to the millisecond, as events are


@dataclass
class RunSummary:
    """How a run ended: what its folder records (training_results.json, live_metrics.json,
    the DNA), and what the run hands back."""

    run_id: str
    run_dir: Path
    config: RunConfig
    status: training_pb2.RunStatus.ValueType
    duration_seconds: float
    dataset: dict[str, Any]
    """`Dataset.summary()`: id, sha256 and record counts."""
    base_models: list[BaseModelInfo]
    placements: list[dict[str, Any]]
    """The memory plan: each member's Placement in the documented JSON shape."""
    progress: TrainingProgress
    """The population's at the end: history, adjustments, best epochs, final weights."""
    dna: str | None = None
    error: str | None = None
    resumable: bool = False
    """Whether resuming could get past the error."""

    @property
    def epochs_run(self) -> int:
        return len(self.progress.history)

    @property
    def last_epoch(self) -> dict[str, Any] | None:
        return self.progress.history[-1] if self.progress.history else None

    @property
    def final_lr_multipliers(self) -> dict[str, float]:
        return lr_multipliers(self.progress.weights, self.config.learning_rate)

    def to_dict(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "run_dir": str(self.run_dir),
            "config": config_to_dict(self.config),
            "base_models": [{**asdict(i), "path": str(i.path)} for i in self.base_models],
            "progress": self.progress.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        return cls(
            **{
                **data,
                "run_dir": Path(data["run_dir"]),
                "config": config_from_dict(data["config"]),
                "base_models": [
                    BaseModelInfo(**{**i, "path": Path(i["path"])}) for i in data["base_models"]
                ],
                "progress": TrainingProgress.from_dict(data["progress"]),
            }
        )


class RunFolder:
    """Everything a run writes to disk goes through here."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.run_id = validate_run_id(self.path.name)
        self.created_at = iso_now()
        manifest = self.path / MANIFEST_FILE
        if manifest.exists():  # an existing run (a worker, a resumed run) keeps its start time
            with suppress(OSError, ValueError, KeyError):
                self.created_at = str(self.read_manifest()["created_at"])

    @classmethod
    def create(cls, models_root: Path, run_id: str) -> RunFolder:
        """Makes the (new, empty) folder of `run_id`; refuses to reuse an existing one."""
        path = certified_root(models_root) / validate_run_id(run_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except FileExistsError as exc:
            raise InvalidInput(f"Run folder {path} already exists.", field="runId") from exc
        except OSError as exc:
            raise ArtifactError(f"Cannot create the run folder {path}: {exc.strerror}.") from exc
        return cls(path)

    def write_manifest(self, config: RunConfig, models: list[dict[str, Any]]) -> None:
        """run.json: what a restarted service needs to list the run (the rest is in events)."""
        self._write(
            MANIFEST_FILE,
            {
                "run_id": self.run_id,
                "created_at": self.created_at,
                "config": config_to_dict(config),
                "models": models,
            },
        )

    def read_manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / MANIFEST_FILE).read_text(encoding="utf-8"))
        return data

    @contextmanager
    def worker_lock(self, wait: float = 0.0) -> Iterator[None]:
        """Held by whichever process trains the run (CLI or service worker) for its whole life,
        so a restarted service can tell a run still being trained from an interrupted one.
        `wait`: seconds to wait for an earlier, exiting holder (a resumed run's old worker).
        The holder's pid is written into the lock file for operators (and fault tests)."""
        with open(self.path / LOCK_FILE, "a+") as handle:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError as exc:
                    if time.monotonic() >= deadline:
                        raise ArtifactError(f"Run {self.run_id} is already being trained.") from exc
                    time.sleep(0.1)
            try:
                with suppress(OSError):  # only informative: a full disk must not stop the run
                    handle.seek(0)
                    handle.truncate()
                    handle.write(f"{os.getpid()}\n")
                    handle.flush()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def failure_verdict(self, error_seq: int) -> bool | None:
        """Whether the failure recorded for the training_error event `error_seq` is resumable;
        None when the worker recorded no verdict for that event (it died first)."""
        try:
            results = json.loads((self.path / RESULTS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(results, dict) or results.get("error_seq") != error_seq:
            return None
        return bool(results.get("resumable"))

    def is_being_trained(self) -> bool:
        lock = self.path / LOCK_FILE
        if not lock.exists():
            return False
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    @property
    def tensorboard_dir(self) -> Path:
        """The run's TensorBoard event files (a log of its events, outside the certificate)."""
        return self.path / TENSORBOARD_DIR

    def started(self) -> None:
        (self.path / ADAPTERS_DIR).mkdir(exist_ok=True)

    def discard(self) -> None:
        """Removes a folder whose run never trained (bad input found while loading)."""
        shutil.rmtree(self.path, ignore_errors=True)

    # ---- during the run ----------------------------------------------------------------

    def save_adapter(self, model_name: str, save: Callable[[Path], None]) -> None:
        """`save(folder)` writes what the model's training produced (PEFT adapter or full
        weights) and its tokenizer, so the folder loads on its own; swapped in whole, never
        half-written."""
        final = self.path / ADAPTERS_DIR / model_name
        staged = final.with_name(f".{model_name}.staging")
        if staged.exists():
            shutil.rmtree(staged)
        try:
            save(staged)
            replace_dir_atomic(staged, final)
        except OneSeekError:
            shutil.rmtree(staged, ignore_errors=True)
            raise  # already says what went wrong (a member lost mid-save, say)
        except Exception as exc:
            # safetensors reports a full disk as its own error type, not as an OSError
            shutil.rmtree(staged, ignore_errors=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ArtifactError(
                f"Cannot write the adapter of '{model_name}' to {final}: {reason}. "
                "Check free space and permissions of MODELS_DIR, then resume the run."
            ) from exc

    def write_live_metrics(self, status: int, state: Mapping[str, Any]) -> None:
        """The latest epoch_end `state` (its event as a dict), in the shape of
        GET /api/training/{runId}/metrics."""
        metrics = {key: state.get(key) for key in LIVE_METRICS_KEYS}
        metrics.update(run_id=self.run_id, status=run_status_name(status))
        self._write(LIVE_METRICS_FILE, metrics)

    def _write(self, name: str, data: Any) -> None:
        try:
            write_json_atomic(self.path / name, data)
        except OSError as exc:
            raise ArtifactError(
                f"Cannot write {self.path / name}: {exc.strerror or exc}. "
                "Check free space and permissions of MODELS_DIR."
            ) from exc

    # ---- endings -----------------------------------------------------------------------

    def _results(self, summary: RunSummary, stop_reason: str) -> dict[str, Any]:
        import peft
        import torch
        import transformers

        progress, last = summary.progress, summary.last_epoch
        return {
            "run_id": self.run_id,
            "status": run_status_name(summary.status),
            "stop_reason": stop_reason,
            "started_at": self.created_at,
            "finished_at": iso_now(),
            "duration_seconds": summary.duration_seconds,
            "config": config_to_dict(summary.config),
            "dataset": summary.dataset,
            "base_models": [info.to_dict() for info in summary.base_models],
            "epochs_run": summary.epochs_run,
            "total_epochs": summary.config.epochs,
            "history": progress.history,
            "weight_adjustments": progress.adjustments,
            "best_epochs": progress.best,
            "best_model": progress.best_model(),
            "final_val_losses": last["val_losses"] if last else {},
            "final_weights": progress.weights,
            "final_lr_multipliers": summary.final_lr_multipliers,
            "final_total_loss": last["total_loss"] if last else None,
            "auto_stop_info": last["auto_stop_info"] if last else None,
            "placement": summary.placements,
            "environment": {
                "device": ", ".join(sorted({p["device"] for p in summary.placements})) or "cpu",
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }

    def _record(self, summary: RunSummary, results: dict[str, Any]) -> None:
        """The ending's live_metrics.json (at 100 %) and training_results.json."""
        last = summary.last_epoch or {"current_epoch": 0, "val_losses": {}}
        final = {
            "total_epochs": summary.config.epochs,
            "weights": summary.progress.weights,
            "lr_multipliers": summary.final_lr_multipliers,
            "progress_percent": 100.0,
            "timestamp": iso_now(),
        }
        self.write_live_metrics(summary.status, {**last, **final})
        self._write(RESULTS_FILE, results)

    def certify(self, summary: RunSummary) -> str:
        """The final files of a run that ended with something to certify; returns its DNA."""
        config, epochs_run = summary.config, summary.epochs_run
        reasons: dict[training_pb2.RunStatus.ValueType, str] = {
            training_pb2.RUN_STATUS_COMPLETED: f"completed all {config.epochs} epochs",
            training_pb2.RUN_STATUS_AUTO_STOPPED: (
                f"confidence auto-stop after epoch {epochs_run}: the population loss changed "
                f"by less than {config.auto_stop.threshold} for "
                f"{config.auto_stop.patience} epoch(s) in a row"
            ),
            training_pb2.RUN_STATUS_STOPPED: f"stopped on request after {epochs_run} epoch(s)",
        }
        self._record(summary, self._results(summary, reasons[summary.status]))
        try:
            signed = self.sign_adapters()
            doc = build_dna(
                run_id=self.run_id,
                created_at=self.created_at,
                base_models=[
                    model_fingerprint(info.name, info.path, info.architecture)
                    for info in summary.base_models
                ],
                dataset=summary.dataset,
                run_dir=self.path,
                final_weights=summary.progress.weights,
                training_config=config_to_dict(config),
                model_signing=signed,
            )
            write_dna(self.path, doc)
            write_ledger_proof(
                self.path,
                run_id=self.run_id,
                dna=doc["dna"],
                immutable_hash=doc["immutable_hash"],
                timestamp=iso_now(),
            )
        except OSError as exc:
            raise ArtifactError(
                f"Cannot write the certificate of {self.path}: {exc.strerror or exc}."
            ) from exc
        return str(doc["dna"])

    def sign_adapters(self) -> dict[str, str]:
        """Signs each adapter folder in the OpenSSF model-signing format (`model_signing
        verify key --signature model_signatures/<model>.sig --public_key
        model_signing_public_key.pem adapters/<model>` checks it) and writes the public key;
        returns the sha256 of those files by their path in the run folder, for the DNA."""
        signer = model_signer()
        signatures = self.path / MODEL_SIGNATURES_DIR
        # what an earlier, interrupted certification left is not certified: start afresh
        shutil.rmtree(signatures, ignore_errors=True)
        signatures.mkdir()
        write_bytes_atomic(self.path / MODEL_SIGNING_PUBLIC_KEY_FILE, signer.public_key_pem)
        signed = {MODEL_SIGNING_PUBLIC_KEY_FILE: _sha256(signer.public_key_pem)}
        adapters = self.path / ADAPTERS_DIR
        for model in sorted(
            p.name for p in adapters.iterdir() if p.is_dir() and not p.is_symlink()
        ):
            data = signer.sign(adapters / model, signatures / f"{model}.sig")
            signed[f"{MODEL_SIGNATURES_DIR}/{model}.sig"] = _sha256(data)
        return signed

    def write_failure(self, summary: RunSummary, error_seq: int) -> None:
        """A failed run keeps an honest record (no certificate: nothing to certify), with its
        error, whether resuming could get past it, and the seq of its training_error event, so
        the service can tell this verdict from a later failure the worker could not record."""
        if not self.path.exists():
            return
        results = self._results(summary, f"failed: {summary.error}")
        results.update(error=summary.error, resumable=summary.resumable, error_seq=error_seq)
        self._record(summary, results)
