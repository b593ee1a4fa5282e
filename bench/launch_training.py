"""The real training service, whose run workers run the bench's epoch emitter instead of the
population trainer: `python bench/launch_training.py --addr 127.0.0.1:PORT`.

The service spawns workers with multiprocessing's `spawn`, which pickles the target by its
qualified name (`epoch_emitter.emit_main`); the child gets this process's sys.path, whose first
entry is bench/, so it imports the emitter. Nothing of the bench is in the production worker.
"""

from __future__ import annotations

import sys

import epoch_emitter

import services.training.worker as worker
from services.cli import main

if __name__ == "__main__":
    worker.worker_main = epoch_emitter.emit_main  # type: ignore[assignment]
    sys.exit(main(["training-service", *sys.argv[1:]]))
