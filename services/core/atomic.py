"""Atomic file writes: a reader sees the old version or the new one, never a torn file.

Write `<name>.tmp` in the same folder, flush, fsync, `os.replace`, fsync the folder.
JSON artifacts have one byte form (`json_bytes`), so `oneseek verify` can tell a file that
was edited by hand from one this project wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def json_bytes(obj: Any) -> bytes:
    """The one on-disk form of a JSON artifact: 2-space indent, key order kept, no NaN."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON for hashing and signing: sorted keys, `(',', ':')` separators."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json_bytes(obj))


def replace_dir_atomic(staged: Path, final: Path) -> None:
    """Move a fully written folder `staged` to `final`, replacing an older `final`.

    Two renames: the old folder is moved aside first, so at every instant `final` is
    either the complete old version or the complete new one (or, after a crash between
    the renames, absent with `<final>.old` holding the previous version).
    """
    staged, final = Path(staged), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
