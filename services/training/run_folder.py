"""The certified run folder: `$MODELS_DIR/oneseek-certified/<runId>/` (DESIGN.md section 7).

Adapters are written as whole folders swapped in atomically; every JSON file goes through
the atomic writer. `certify` writes the final files in the order the DNA needs them:
live_metrics.json, training_results.json, then oneseek_dna.json and ledger_proof.json.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.api import training_pb2
from services.api.codec import event_to_dict, run_status_name
from services.api.run_config import RunConfig, config_to_dict
from services.core.atomic import replace_dir_atomic, write_json_atomic
from services.core.dna import build_dna, model_fingerprint, write_dna
from services.core.errors import ArtifactError, InvalidInput
from services.core.ledger import write_ledger_proof
from services.core.training_config import TRAINING_CONFIG, validate_run_id

if TYPE_CHECKING:
    from services.training.population import PopulationTrainer

CERTIFIED_DIR = str(TRAINING_CONFIG["metadata"]["certified_dir"])
MANIFEST_FILE = "run.json"
LOCK_FILE = ".worker.lock"
RESULTS_FILE = "training_results.json"
LIVE_METRICS_FILE = "live_metrics.json"
ADAPTERS_DIR = "adapters"


def iso_now() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def certified_root(models_root: Path) -> Path:
    return Path(models_root) / CERTIFIED_DIR


@dataclass(frozen=True)
class Certificate:
    dna: str
    immutable_hash: str


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

    def worker_pid(self) -> int | None:
        """The pid of the process training the run now, or None when none is."""
        if not self.is_being_trained():
            return None
        try:
            return int((self.path / LOCK_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

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

    def started(self) -> None:
        (self.path / ADAPTERS_DIR).mkdir(exist_ok=True)

    def discard(self) -> None:
        """Removes a folder whose run never trained (bad input found while loading)."""
        shutil.rmtree(self.path, ignore_errors=True)

    # ---- during the run ----------------------------------------------------------------

    def adapter_dir(self, model_name: str) -> Path:
        return self.path / ADAPTERS_DIR / model_name

    def save_adapter(self, model_name: str, model: Any, tokenizer: Any) -> None:
        """Saves what the model's trainer produces (PEFT adapter or full weights) and its
        tokenizer, so the folder loads on its own; swapped in whole, never half-written."""
        final = self.adapter_dir(model_name)
        staged = final.with_name(f".{model_name}.staging")
        if staged.exists():
            shutil.rmtree(staged)
        try:
            model.save_pretrained(staged)  # safetensors: the default of both PEFT and transformers
            tokenizer.save_pretrained(staged)
            replace_dir_atomic(staged, final)
        except Exception as exc:
            # safetensors reports a full disk as its own error type, not as an OSError
            shutil.rmtree(staged, ignore_errors=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ArtifactError(
                f"Cannot write the adapter of '{model_name}' to {final}: {reason}. "
                "Check free space and permissions of MODELS_DIR, then resume the run."
            ) from exc

    @staticmethod
    def epoch_record(event: training_pb2.TrainingEvent) -> dict[str, Any]:
        return event_to_dict(event)

    def write_live_metrics(self, event: training_pb2.TrainingEvent, status: int) -> None:
        """The latest epoch_end state, in the shape of GET /api/training/{runId}/metrics."""
        payload = event_to_dict(event)
        self._write(
            LIVE_METRICS_FILE,
            {
                "run_id": self.run_id,
                "status": run_status_name(status),
                "current_epoch": payload["current_epoch"],
                "total_epochs": payload["total_epochs"],
                "val_losses": payload["val_losses"],
                "weights": payload["weights"],
                "lr_multipliers": payload["lr_multipliers"],
                "total_loss": payload["total_loss"],
                "auto_stop_info": payload["auto_stop_info"],
                "progress_percent": payload["progress_percent"],
                "timestamp": payload["timestamp"],
            },
        )

    def _write(self, name: str, data: Any) -> None:
        try:
            write_json_atomic(self.path / name, data)
        except OSError as exc:
            raise ArtifactError(
                f"Cannot write {self.path / name}: {exc.strerror or exc}. "
                "Check free space and permissions of MODELS_DIR."
            ) from exc

    # ---- endings -----------------------------------------------------------------------

    def _results(
        self, trainer: PopulationTrainer, *, status: int, duration: float, stop_reason: str
    ) -> dict[str, Any]:
        import peft
        import torch
        import transformers

        config = trainer.config
        last = trainer.history[-1] if trainer.history else None
        return {
            "run_id": self.run_id,
            "status": run_status_name(status),
            "stop_reason": stop_reason,
            "started_at": self.created_at,
            "finished_at": iso_now(),
            "duration_seconds": duration,
            "config": config_to_dict(config),
            "dataset": trainer.dataset.summary(trainer.train_count, trainer.val_count),
            "base_models": [info.to_dict() for info in trainer.infos],
            "epochs_run": len(trainer.history),
            "total_epochs": config.epochs,
            "history": trainer.history,
            "weight_adjustments": trainer.adjustments,
            "best_epochs": {
                slot.name: {"epoch": slot.best_epoch, "val_loss": slot.best_val_loss}
                for slot in trainer.slots
            },
            "best_model": trainer.best_model(),
            "final_val_losses": last["val_losses"] if last else {},
            "final_weights": dict(trainer.weights),
            "final_lr_multipliers": trainer.effective_lrs(),
            "final_total_loss": last["total_loss"] if last else None,
            "auto_stop_info": last["auto_stop_info"] if last else None,
            "environment": {
                "device": str(trainer.device),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }

    def _final_live_metrics(self, trainer: PopulationTrainer, status: int) -> dict[str, Any]:
        last = trainer.history[-1] if trainer.history else None
        return {
            "run_id": self.run_id,
            "status": run_status_name(status),
            "current_epoch": last["current_epoch"] if last else 0,
            "total_epochs": trainer.config.epochs,
            "val_losses": last["val_losses"] if last else {},
            "weights": dict(trainer.weights),
            "lr_multipliers": trainer.effective_lrs(),
            "total_loss": last["total_loss"] if last else None,
            "auto_stop_info": last["auto_stop_info"] if last else None,
            "progress_percent": 100.0,
            "timestamp": iso_now(),
        }

    def certify(
        self,
        *,
        trainer: PopulationTrainer,
        status: training_pb2.RunStatus.ValueType,
        epochs_run: int,
        duration: float,
    ) -> Certificate:
        reasons: dict[training_pb2.RunStatus.ValueType, str] = {
            training_pb2.RUN_STATUS_COMPLETED: f"completed all {trainer.config.epochs} epochs",
            training_pb2.RUN_STATUS_AUTO_STOPPED: (
                f"confidence auto-stop after epoch {epochs_run}: the population loss changed "
                f"by less than {trainer.config.auto_stop.threshold} for "
                f"{trainer.config.auto_stop.patience} epoch(s) in a row"
            ),
            training_pb2.RUN_STATUS_STOPPED: f"stopped on request after {epochs_run} epoch(s)",
        }
        self._write(LIVE_METRICS_FILE, self._final_live_metrics(trainer, status))
        self._write(
            RESULTS_FILE,
            self._results(trainer, status=status, duration=duration, stop_reason=reasons[status]),
        )
        try:
            doc = build_dna(
                run_id=self.run_id,
                created_at=self.created_at,
                base_models=[
                    model_fingerprint(info.name, info.path, info.architecture)
                    for info in trainer.infos
                ],
                dataset=trainer.dataset.summary(trainer.train_count, trainer.val_count),
                run_dir=self.path,
                final_weights=dict(trainer.weights),
                training_config=config_to_dict(trainer.config),
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
        return Certificate(dna=doc["dna"], immutable_hash=doc["immutable_hash"])

    def write_failure(
        self,
        *,
        trainer: PopulationTrainer,
        message: str,
        duration: float,
        resumable: bool = False,
        error_seq: int | None = None,
    ) -> None:
        """A failed run keeps an honest record (no certificate: nothing to certify).

        `resumable` says whether resuming could get past the failure, and `error_seq` is the
        seq of the training_error event it belongs to, so the service can tell this verdict
        from a later failure the worker could not record (it was killed)."""
        if not self.path.exists():
            return
        status = training_pb2.RUN_STATUS_FAILED
        results = self._results(
            trainer, status=status, duration=duration, stop_reason=f"failed: {message}"
        )
        results["error"] = message
        results["resumable"] = resumable
        results["error_seq"] = error_seq
        self._write(LIVE_METRICS_FILE, self._final_live_metrics(trainer, status))
        self._write(RESULTS_FILE, results)
