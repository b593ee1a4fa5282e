"""Torn writes: a writer process killed with SIGKILL at random moments while it rewrites JSON
artifacts with `write_json_atomic`, hundreds of times. After every kill, each JSON file that
exists parses and is one complete version, never older than a version seen before; a leftover
`<name>.tmp` is allowed, is never the file itself, and does not stop the next writer.

A control runs the same harness with a writer that rewrites the file in place, and must see
torn files: the harness can tell a torn file from a whole one.

One process forks every writer (no interpreter start per trial), and the files live on tmpfs
where there is one (/dev/shm): what a kill can tear is decided by write() and rename(), the same
there as on a disk, while fsync (only a power cut needs it) costs milliseconds on a disk and
nothing on tmpfs. So 200 trials take seconds.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
NAMES = ("live_metrics.json", "training_results.json", "oneseek_dna.json")
TRIALS = 200
SEED = 20260601
ROWS = 200  # about 24 KB per file: several page-cache pages per version
MAX_DELAY_US = 12_000

# The forking process. Each "trial N MICROSECONDS" line forks a writer that rewrites every file
# in turn, versions N*1000000+1, +2, ...; MICROSECONDS after its first complete version it is
# killed with SIGKILL and reaped, and the line "killed N" reports it. The writer is
# `write_json_atomic` or, for the control, an in-place rewrite (open with truncation, write,
# fsync).
HARNESS = r"""
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from services.core.atomic import json_bytes, write_json_atomic

folder, mode = Path(sys.argv[1]), sys.argv[2]
names = sys.argv[4].split(",")
rows = int(sys.argv[5])

def document(version):
    return {"version": version, "rows": [
        {"i": i, "v": version, "check": (version * 7919 + i) % 1000003, "pad": "x" * 40}
        for i in range(rows)]}

def in_place(path, obj):
    with open(path, "wb") as handle:
        handle.write(json_bytes(obj))
        handle.flush()
        os.fsync(handle.fileno())

write = write_json_atomic if mode == "atomic" else in_place
print("ready", flush=True)
for line in sys.stdin:
    word, trial, micros = line.split()
    first_done, signal_first = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(first_done)
            version = int(trial) * 1000000
            while True:
                for name in names:
                    version += 1
                    write(folder / name, document(version))
                    if signal_first is not None:
                        os.write(signal_first, b"1")
                        os.close(signal_first)
                        signal_first = None
        finally:
            os._exit(1)
    os.close(signal_first)
    if os.read(first_done, 1) != b"1":
        print("writer failed", trial, flush=True)
        break
    os.close(first_done)
    time.sleep(int(micros) / 1e6)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("killed", trial, flush=True)
"""


def document(version: int) -> dict[str, Any]:
    """The complete content of `version` (as the harness writes it)."""
    return {
        "version": version,
        "rows": [
            {"i": i, "v": version, "check": (version * 7919 + i) % 1000003, "pad": "x" * 40}
            for i in range(ROWS)
        ],
    }


@dataclass
class Outcome:
    torn: list[str] = field(default_factory=list)
    """What was wrong with each file that was not one complete, current-or-newer version."""
    seen: dict[str, int] = field(default_factory=dict)
    """Each file's newest version seen so far."""
    versions: set[int] = field(default_factory=set)
    files_checked: int = 0
    leftover_tmp: int = 0
    recovered_after_tmp: int = 0
    """Times a file left with a .tmp beside it later got a newer version: the next writer was
    not stopped by the leftover."""


def check_files(folder: Path, trial: int, outcome: Outcome, pending_tmp: set[str]) -> None:
    for name in NAMES:
        path = folder / name
        if (folder / f"{name}.tmp").exists():
            outcome.leftover_tmp += 1
            pending_tmp.add(name)
        if not path.exists():
            continue
        outcome.files_checked += 1
        raw = path.read_bytes()
        try:
            data = json.loads(raw)
        except ValueError as error:
            outcome.torn.append(f"trial {trial}: {name} does not parse ({error}; {len(raw)} B)")
            continue
        version = data.get("version") if isinstance(data, dict) else None
        if not isinstance(version, int) or data != document(version):
            outcome.torn.append(f"trial {trial}: {name} parses but is no complete version")
            continue
        if version // 1_000_000 > trial:
            outcome.torn.append(f"trial {trial}: {name} has version {version} of a later trial")
        if version < outcome.seen.get(name, 0):
            outcome.torn.append(
                f"trial {trial}: {name} went back from version {outcome.seen[name]} to {version}"
            )
        if version > outcome.seen.get(name, 0) and name in pending_tmp:
            outcome.recovered_after_tmp += 1
            pending_tmp.discard(name)
        outcome.seen[name] = max(version, outcome.seen.get(name, 0))
        outcome.versions.add(version)


def kill_writers(folder: Path, mode: str, trials: int, seed: int) -> Outcome:
    """`trials` writers killed at seeded random moments (0-12 ms after each one's first complete
    version); the files checked after each kill."""
    rng = random.Random(seed)
    outcome = Outcome()
    pending_tmp: set[str] = set()
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(folder), mode, str(REPO), ",".join(NAMES), str(ROWS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert harness.stdin is not None and harness.stdout is not None
    try:
        assert harness.stdout.readline().strip() == "ready"
        for trial in range(1, trials + 1):
            harness.stdin.write(f"trial {trial} {rng.randint(0, MAX_DELAY_US)}\n")
            harness.stdin.flush()
            assert harness.stdout.readline().split() == ["killed", str(trial)]
            check_files(folder, trial, outcome, pending_tmp)
    finally:
        harness.stdin.close()
        try:
            harness.wait(30)
        except subprocess.TimeoutExpired:
            harness.kill()
            harness.wait()
        harness.stdout.close()
    return outcome


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder on tmpfs when the machine has one, else under tmp_path."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    made = Path(tempfile.mkdtemp(prefix="torn-writes-", dir=shm))
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


@pytest.mark.slow
def test_atomic_writer_killed_200_times_never_leaves_a_torn_file(folder: Path) -> None:
    # an earlier crash left half-written temporaries: never read as the files, never in the way
    for name in NAMES:
        (folder / f"{name}.tmp").write_bytes(b'{"version": 1, "rows": [')
    outcome = kill_writers(folder, "atomic", TRIALS, SEED)
    assert outcome.torn == []
    # every writer completed a version before its kill: each trial had a file to check
    assert len(outcome.versions) >= TRIALS, len(outcome.versions)
    assert outcome.files_checked >= TRIALS, outcome.files_checked
    assert set(outcome.seen) == set(NAMES)
    assert outcome.recovered_after_tmp >= len(NAMES)
    print(
        f"torn 0 of {outcome.files_checked} files checked after {TRIALS} kills; "
        f"{len(outcome.versions)} versions seen, .tmp left beside a file "
        f"{outcome.leftover_tmp} times"
    )


@pytest.mark.slow
def test_the_harness_catches_an_in_place_writer(folder: Path) -> None:
    """The control: rewriting a file in place does tear it when the writer is killed."""
    outcome = kill_writers(folder, "in_place", 60, SEED)
    assert outcome.torn, "60 kills of an in-place writer left no torn file"
    print(f"in-place writer: {len(outcome.torn)} torn of {outcome.files_checked} files checked")
