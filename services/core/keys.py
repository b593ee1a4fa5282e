"""The private keys the suite signs with: the one an environment variable names (PEM), else a
local one made once (mode 0600, in a 0700 folder of the state folder) and reused.

Two keys are kept this way: the ledger's Ed25519 key (proofs, export manifests) and the EC
P-256 key of OpenSSF model signatures, which take no Ed25519. A key that was named must exist;
only the default local key is ever created.
"""

from __future__ import annotations

import binascii
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from services.core.atomic import fsync_dir
from services.core.errors import InvalidInput
from services.core.layout import state_dir

KEYS_DIR = "ledger"
"""The keys' folder in the state folder (the ledger key's, since before there were two)."""


@dataclass(frozen=True)
class KeySpec:
    """One kind of signing key: where it is named, where the local one lives, what it is."""

    env: str
    """The environment variable that names the key's PEM file."""
    filename: str
    """The local key's file name in `<state>/ledger/`."""
    kind: str
    """What the key must be, in words: "an Ed25519 key"."""
    signer: str
    """Who signs with it, in words: "the ledger signer"."""
    why: str
    """Why that kind, in words: "proofs are signed with Ed25519"."""
    make: str
    """The command that makes one: "openssl genpkey -algorithm ed25519"."""
    generate: Callable[[], PrivateKeyTypes]
    accepts: Callable[[PrivateKeyTypes], bool]
    describe: Callable[[PrivateKeyTypes], str] = lambda key: f"a {type(key).__name__.lstrip('_')}"
    """What a refused key is, in words."""

    def default_path(self) -> Path:
        return state_dir() / KEYS_DIR / self.filename

    def path(self, given: Path | None = None) -> tuple[Path, str]:
        """Where the key is: `given`, else the file the environment names, else the local
        key's; with the name of what chose it (for messages)."""
        if given is not None:
            return Path(given), "path"
        named = os.environ.get(self.env)
        if named:
            return Path(named), self.env
        return self.default_path(), "default key"

    def load(self, given: Path | None = None) -> tuple[PrivateKeyTypes, Path]:
        """The key and the file it is in: `given`, else $env, else the local key (made on
        first use)."""
        path, field = self.path(given)
        if field == "default key":
            return self._load_or_create(path), path
        return self.read(path, field=field), path

    def read(self, path: Path, *, field: str) -> PrivateKeyTypes:
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise InvalidInput(
                f"{field} names {path}, which does not exist; point it at {self.kind} in "
                f"PEM form, or unset {self.env} to use the local key in "
                f"{self.default_path().parent}.",
                field=field,
            ) from None
        except OSError as error:
            raise InvalidInput(
                f"{field} names {path}, which cannot be read ({error.strerror}).", field=field
            ) from None
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except TypeError:
            raise InvalidInput(
                f"{path} is an encrypted key; {self.signer} needs an unencrypted PEM "
                "(keep it readable only by its owner, mode 0600).",
                field=field,
            ) from None
        except (ValueError, binascii.Error):
            raise InvalidInput(
                f"{path} is not a PEM private key; expected {self.kind} ({self.make}).",
                field=field,
            ) from None
        if not self.accepts(key):
            raise InvalidInput(
                f"{path} holds {self.describe(key)}, not {self.kind}; {self.why} ({self.make}).",
                field=field,
            )
        return key

    def _load_or_create(self, path: Path) -> PrivateKeyTypes:
        if path.exists():
            return self.read(path, field="default key")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        key = self.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Publish a complete file under the final name exclusively: two processes racing here
        # both write a temp file, one hard link wins, the other reads the winner's key.
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".key-", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return self.read(path, field="default key")
            except OSError:
                # Filesystems without hard links: exclusive create of the final name instead.
                if not _create_exclusive(path, pem):
                    return self.read(path, field="default key")
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return key


def _create_exclusive(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return True
