"""`oneseek verify`: recompute every hash of a certified run folder, or of a model exported
from one, and check the signatures.

Offline and read-only. Every difference becomes one sentence naming the file and what
differs; things that could not be checked become notes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.atomic import json_bytes
from services.core.dna import (
    ARTIFACT_FILES,
    DNA_VERSION,
    compute_dna_string,
    compute_immutable_hash,
    hash_tree,
    sha256_file,
    weight_files,
)
from services.core.errors import OneSeekError
from services.core.layout import (
    ADAPTERS_DIR,
    CERTIFIED_DIR,
    DNA_FILE,
    EXPORT_FORMAT,
    EXPORT_MANIFEST_FILE,
    EXPORT_SIGNATURE_FILE,
    LOGS,
    MODEL_SIGNATURES_DIR,
    MODEL_SIGNING_PUBLIC_KEY_FILE,
    PROOF_FILE,
)
from services.core.ledger import ALGORITHM, PROOF_EVENT, verify_proof_signature
from services.core.model_signatures import verify_signature

JSON_FILES = (*ARTIFACT_FILES, DNA_FILE, PROOF_FILE)
MODEL_SIGNING_FIELD = "model_signing"
"""The DNA's {run folder path: sha256} of the OpenSSF model signatures and their public key."""


@dataclass(frozen=True)
class VerifyReport:
    run_dir: Path
    problems: list[str]
    """Each a sentence naming a file and what differs; any problem means not verified."""
    notes: list[str]
    """What was not or could not be checked, and why; notes never fail a run folder."""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_run_folder(
    run_dir: Path,
    *,
    models_root: Path | None = None,
    trusted_public_key: str | None = None,
    base_models: Collection[str] | None = None,
) -> VerifyReport:
    """Check a run folder against its own DNA and signed proof.

    `models_root` is where base model folders live; when omitted and the run sits in
    `<models>/oneseek-certified/<runId>/`, that `<models>` is used. `trusted_public_key`
    (base64, raw Ed25519) pins who must have signed; without it the signature only shows
    the proof is intact, since anyone can re-sign a forged proof with a key of their own.
    `base_models` limits the rehashing of base model weights to those models (loading one
    model of a run of several 7B checkpoints need not read all of them); the rest is checked.
    """
    run_dir = Path(run_dir)
    problems: list[str] = []
    notes: list[str] = []
    report = VerifyReport(run_dir=run_dir, problems=problems, notes=notes)
    if not run_dir.is_dir():
        problems.append(f"{run_dir} is not a run folder (it does not exist or is not a folder).")
        return report

    docs = {name: _read_json_artifact(run_dir / name, problems) for name in JSON_FILES}
    adapters_dir = run_dir / ADAPTERS_DIR
    if adapters_dir.is_symlink() or not adapters_dir.is_dir():
        problems.append(f"{ADAPTERS_DIR}/ is missing (or is not a real folder).")

    dna = docs[DNA_FILE]
    if dna is not None and not isinstance(dna, dict):
        problems.append(f"{DNA_FILE} is not a JSON object.")
    if isinstance(dna, dict):
        _check_dna(run_dir, dna, problems)
        if not adapters_dir.is_symlink() and adapters_dir.is_dir():
            _check_adapters(adapters_dir, dna.get("adapters"), problems)
        _check_model_signatures(run_dir, dna, problems, notes)
        if models_root is None:
            models_root = _models_root_of(run_dir)
        _check_base_models(dna.get("base_models"), models_root, problems, notes, base_models)

    proof = docs[PROOF_FILE]
    if proof is not None and not isinstance(proof, dict):
        problems.append(f"{PROOF_FILE} is not a JSON object.")
    if isinstance(proof, dict):
        _check_proof(proof, dna if isinstance(dna, dict) else None, trusted_public_key, problems)
        _note_signer_and_ledger(proof, trusted_public_key, notes)

    expected = {
        *JSON_FILES,
        ADAPTERS_DIR,
        MODEL_SIGNATURES_DIR,
        MODEL_SIGNING_PUBLIC_KEY_FILE,
        *LOGS,
    }
    for extra in sorted(p.name for p in run_dir.iterdir() if p.name not in expected):
        notes.append(f"{extra} is in the run folder but is not part of the certified run.")
    return report


def verify_export_folder(
    path: Path, *, models_root: Path | None = None, trusted_public_key: str | None = None
) -> VerifyReport:
    """Check a folder `oneseek export` wrote against its signed manifest (oneseek_export.json)
    and the certificate of the run it came from, which it carries (oneseek_dna.json and
    ledger_proof.json beside the manifest).

    Every file is hashed against the manifest (a changed, missing or extra file is a problem),
    the manifest's signature and the run's proof are checked, the manifest must name the run,
    DNA and immutable_hash of the DNA it carries, and every file it says was copied from the
    run folder must have the hash the DNA records for that file. `models_root`: for an
    adapter-only export, also check the base model found there. `trusted_public_key` pins who
    must have signed both the proof and the manifest.
    """
    path = Path(path)
    problems: list[str] = []
    notes: list[str] = []
    report = VerifyReport(run_dir=path, problems=problems, notes=notes)
    if not path.is_dir():
        problems.append(f"{path} is not an export folder (it does not exist or is not a folder).")
        return report
    manifest = _read_json_artifact(path / EXPORT_MANIFEST_FILE, problems)
    if manifest is None:
        return report
    if not isinstance(manifest, dict):
        problems.append(f"{EXPORT_MANIFEST_FILE} is not a JSON object.")
        return report
    if manifest.get("format") != EXPORT_FORMAT:
        problems.append(
            f"{EXPORT_MANIFEST_FILE} has format {manifest.get('format')!r}; this oneseek "
            f"verifies {EXPORT_FORMAT}."
        )
    _check_signature(EXPORT_MANIFEST_FILE, manifest, "manifest", trusted_public_key, problems)
    files = _check_export_files(path, manifest.get("files"), problems)
    _check_export_model_signature(path, files, problems, notes)

    dna = _read_json_artifact(path / DNA_FILE, problems)
    if dna is not None and not isinstance(dna, dict):
        problems.append(f"{DNA_FILE} is not a JSON object.")
        dna = None
    if dna is not None:
        _check_dna_content(dna, problems)
        _check_export_against_dna(manifest, dna, files, problems)
    proof = _read_json_artifact(path / PROOF_FILE, problems)
    if proof is not None and not isinstance(proof, dict):
        problems.append(f"{PROOF_FILE} is not a JSON object.")
    elif proof is not None:
        _check_proof(proof, dna, trusted_public_key, problems)
        _note_signer_and_ledger(proof, trusted_public_key, notes)
        signer = manifest.get("signer_public_key")
        if trusted_public_key is None and signer != proof.get("signer_public_key"):
            notes.append(
                f"{EXPORT_MANIFEST_FILE} was signed by key {signer}, not by the key that signed "
                f"the run's proof; both signatures are valid, but they are two signers."
            )
    if dna is not None and manifest.get("merged") is False:
        base = [m for m in dna.get("base_models") or () if _named(m, manifest.get("model"))]
        if models_root is None:
            notes.append(
                f"The base model {manifest.get('model')} is not part of an adapter export; "
                f"{DNA_FILE} holds its hashes (give the folder that holds it to check a copy)."
            )
        else:
            _check_base_models(base, Path(models_root), problems, notes)
    return report


def _named(entry: Any, name: Any) -> bool:
    return isinstance(entry, dict) and entry.get("name") == name


def _check_export_files(path: Path, recorded: Any, problems: list[str]) -> dict[str, str]:
    """The hashes the manifest records, each compared with the file's; returns them."""
    if not isinstance(recorded, dict) or not all(
        isinstance(name, str) and isinstance(digest, str) for name, digest in recorded.items()
    ):
        problems.append(f"{EXPORT_MANIFEST_FILE} has no files object of {{path: sha256}}.")
        return {}
    try:
        actual = hash_tree(path)
    except OneSeekError as error:
        problems.append(f"{path} cannot be hashed: {error}")
        return recorded
    actual.pop(EXPORT_MANIFEST_FILE, None)
    for name in sorted(recorded.keys() | actual.keys()):
        if name not in actual:
            problems.append(f"{name} is missing ({EXPORT_MANIFEST_FILE} lists it).")
        elif name not in recorded:
            problems.append(f"{name} is an extra file that {EXPORT_MANIFEST_FILE} does not list.")
        elif actual[name] != recorded[name]:
            problems.append(
                f"{name} has changed since it was exported (sha256 {actual[name]}, "
                f"{EXPORT_MANIFEST_FILE} records {recorded[name]})."
            )
    return recorded


def _check_export_model_signature(
    path: Path, files: Mapping[str, str], problems: list[str], notes: list[str]
) -> None:
    """The export's OpenSSF model signature (model.sig, which the manifest lists) holds for
    the folder with the public key beside it, as `model_signing verify key` checks it."""
    if EXPORT_SIGNATURE_FILE not in files:
        notes.append(
            f"{EXPORT_MANIFEST_FILE} lists no OpenSSF model signature ({EXPORT_SIGNATURE_FILE}): "
            "the folder was exported before oneseek signed exports."
        )
        return
    signature, public_key = path / EXPORT_SIGNATURE_FILE, path / MODEL_SIGNING_PUBLIC_KEY_FILE
    if not signature.is_file() or not public_key.is_file():
        return  # reported as missing by the manifest check
    reason = verify_signature(path, signature, public_key)
    if reason is not None:
        problems.append(
            f"{EXPORT_SIGNATURE_FILE}: the OpenSSF model signature does not verify for this "
            f"folder with {MODEL_SIGNING_PUBLIC_KEY_FILE}: {reason}"
        )


def _check_export_against_dna(
    manifest: dict[str, Any], dna: dict[str, Any], files: dict[str, str], problems: list[str]
) -> None:
    """The manifest speaks of the run the DNA certifies, and the files it says it copied from
    the run folder are the certified ones."""
    for field in ("run_id", "dna", "immutable_hash"):
        if manifest.get(field) != dna.get(field):
            problems.append(
                f"{EXPORT_MANIFEST_FILE}: {field} {manifest.get(field)!r} differs from "
                f"{DNA_FILE}'s {dna.get(field)!r}."
            )
    model = manifest.get("model")
    adapters = dna.get("adapters")
    certified = adapters.get(model) if isinstance(adapters, dict) else None
    if not isinstance(certified, dict):
        problems.append(f"{EXPORT_MANIFEST_FILE} names model {model!r}, which {DNA_FILE} lacks.")
        return
    copied = manifest.get("certified_files")
    if not isinstance(copied, dict):
        problems.append(
            f"{EXPORT_MANIFEST_FILE} has no certified_files object of {{path: run folder path}}."
        )
        return
    prefix = f"{ADAPTERS_DIR}/{model}/"
    for name, origin in sorted(copied.items()):
        inner = origin[len(prefix) :] if isinstance(origin, str) else ""
        if not isinstance(origin, str) or not origin.startswith(prefix) or inner not in certified:
            problems.append(
                f"{EXPORT_MANIFEST_FILE}: {name} is said to come from {origin!r}, which "
                f"{DNA_FILE} does not list for {model}."
            )
        elif files.get(name) != certified[inner]:
            problems.append(
                f"{name} is not the certified {origin} (sha256 {files.get(name)}, {DNA_FILE} "
                f"records {certified[inner]})."
            )


def _read_json_artifact(path: Path, problems: list[str]) -> Any:
    name = path.name
    if path.is_symlink():
        problems.append(f"{name} is a symlink; a certified run folder holds regular files only.")
        return None
    if not path.is_file():
        problems.append(f"{name} is missing.")
        return None
    raw = path.read_bytes()
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        problems.append(f"{name} is not UTF-8 text.")
        return None
    except json.JSONDecodeError as error:
        problems.append(
            f"{name} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})."
        )
        return None
    except RecursionError:
        problems.append(f"{name} is nested too deeply to be a file oneseek wrote.")
        return None
    try:
        same_form = json_bytes(parsed) == raw
    except ValueError:  # NaN or Infinity, which oneseek never writes
        same_form = False
    if not same_form:
        problems.append(f"{name} is not in the form oneseek writes (edited by hand?).")
    return parsed


def _check_dna(run_dir: Path, dna: dict[str, Any], problems: list[str]) -> None:
    if dna.get("run_id") != run_dir.name:
        problems.append(
            f"{DNA_FILE} is for run {dna.get('run_id')!r} but the folder is named {run_dir.name!r}."
        )

    artifacts = dna.get("artifacts")
    if not isinstance(artifacts, dict):
        problems.append(f"{DNA_FILE} has no artifacts object with the metric files' hashes.")
        artifacts = {}
    for name in ARTIFACT_FILES:
        recorded = artifacts.get(name)
        path = run_dir / name
        if not isinstance(recorded, str):
            problems.append(f"{DNA_FILE} records no sha256 for {name}.")
        elif path.is_file() and not path.is_symlink():
            actual = sha256_file(path)
            if actual != recorded:
                problems.append(
                    f"{name} has changed since the run was certified (sha256 {actual}, "
                    f"{DNA_FILE} records {recorded})."
                )
    _check_dna_content(dna, problems)


def _check_dna_content(dna: dict[str, Any], problems: list[str]) -> None:
    """The DNA document against itself: its version, immutable_hash and dna string."""
    if dna.get("version") != DNA_VERSION:
        problems.append(
            f"{DNA_FILE} has version {dna.get('version')!r}; this oneseek verifies {DNA_VERSION}."
        )
    recorded_hash = dna.get("immutable_hash")
    actual_hash = compute_immutable_hash(dna)
    if recorded_hash != actual_hash:
        problems.append(
            f"{DNA_FILE}: immutable_hash {recorded_hash!r} does not match its content "
            f"(computed {actual_hash})."
        )
    try:
        actual_dna = compute_dna_string(dna)
    except OneSeekError as error:
        problems.append(f"{DNA_FILE}: the dna string cannot be recomputed: {error}")
    else:
        if dna.get("dna") != actual_dna:
            problems.append(
                f"{DNA_FILE}: dna {dna.get('dna')!r} does not match its content "
                f"(computed {actual_dna})."
            )


def _check_adapters(adapters_dir: Path, recorded: Any, problems: list[str]) -> None:
    if not isinstance(recorded, dict) or not all(
        isinstance(files, dict) and all(isinstance(h, str) for h in files.values())
        for files in recorded.values()
    ):
        problems.append(f"{DNA_FILE} has no adapters object of {{model: {{file: sha256}}}}.")
        return
    expected = {
        f"{model}/{relpath}": digest
        for model, files in recorded.items()
        for relpath, digest in files.items()
    }
    try:
        actual = hash_tree(adapters_dir)
    except OneSeekError as error:
        problems.append(f"{ADAPTERS_DIR}/ cannot be hashed: {error}")
        return
    for path in sorted(expected.keys() | actual.keys()):
        shown = f"{ADAPTERS_DIR}/{path}"
        if path not in actual:
            problems.append(f"{shown} is missing ({DNA_FILE} lists it).")
        elif path not in expected:
            problems.append(f"{shown} is an extra file that {DNA_FILE} does not list.")
        elif actual[path] != expected[path]:
            problems.append(
                f"{shown} has changed since the run was certified (sha256 {actual[path]}, "
                f"{DNA_FILE} records {expected[path]})."
            )


def _check_model_signatures(
    run_dir: Path, dna: dict[str, Any], problems: list[str], notes: list[str]
) -> None:
    """Each adapter's OpenSSF model signature and the public key are the files the DNA pins,
    and each signature holds for its adapter folder, as `model_signing verify key` checks it."""
    recorded = dna.get(MODEL_SIGNING_FIELD)
    if recorded is None:
        notes.append(
            f"{DNA_FILE} records no OpenSSF model signatures (the run was certified before "
            "oneseek signed adapters); the adapters are checked against the DNA alone."
        )
        return
    if not isinstance(recorded, dict) or not all(
        isinstance(name, str) and isinstance(digest, str) for name, digest in recorded.items()
    ):
        problems.append(f"{DNA_FILE} has no {MODEL_SIGNING_FIELD} object of {{path: sha256}}.")
        return
    adapters = dna.get("adapters")
    models = sorted(m for m in adapters if _plain_name(m)) if isinstance(adapters, dict) else []
    expected = {MODEL_SIGNING_PUBLIC_KEY_FILE, *(_signature_of(m) for m in models)}
    for name in sorted(expected - recorded.keys()):
        problems.append(f"{DNA_FILE} records no sha256 for {name}.")
    signatures = run_dir / MODEL_SIGNATURES_DIR
    present = (
        {f"{MODEL_SIGNATURES_DIR}/{p.name}" for p in signatures.iterdir()}
        if signatures.is_dir() and not signatures.is_symlink()
        else set()
    )
    for name in sorted(present - recorded.keys()):
        problems.append(f"{name} is an extra file that {DNA_FILE} does not list.")
    for name, digest in sorted(recorded.items()):
        if name != MODEL_SIGNING_PUBLIC_KEY_FILE and name not in map(_signature_of, models):
            problems.append(f"{DNA_FILE} lists {name!r}, which is no model's signature.")
            continue
        path = run_dir / name
        if path.is_symlink() or not path.is_file():
            problems.append(f"{name} is missing ({DNA_FILE} lists it).")
        elif (actual := sha256_file(path)) != digest:
            problems.append(
                f"{name} has changed since the run was certified (sha256 {actual}, {DNA_FILE} "
                f"records {digest})."
            )
    public_key = run_dir / MODEL_SIGNING_PUBLIC_KEY_FILE
    for model in models:
        folder, signature = run_dir / ADAPTERS_DIR / model, run_dir / _signature_of(model)
        if not (public_key.is_file() and signature.is_file() and folder.is_dir()):
            continue  # reported above
        if folder.is_symlink() or signature.is_symlink() or public_key.is_symlink():
            continue
        reason = verify_signature(folder, signature, public_key)
        if reason is not None:
            problems.append(
                f"{ADAPTERS_DIR}/{model}/ does not verify against its OpenSSF model signature "
                f"{_signature_of(model)}: {reason}"
            )


def _signature_of(model: str) -> str:
    return f"{MODEL_SIGNATURES_DIR}/{model}.sig"


def _plain_name(name: Any) -> bool:
    """A model name from the file being verified names one folder, never a path elsewhere."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _models_root_of(run_dir: Path) -> Path | None:
    resolved = run_dir.resolve()
    if resolved.parent.name == CERTIFIED_DIR:
        return resolved.parent.parent
    return None


def _check_base_models(
    base_models: Any,
    models_root: Path | None,
    problems: list[str],
    notes: list[str],
    only: Collection[str] | None = None,
) -> None:
    if not isinstance(base_models, list) or not all(isinstance(m, dict) for m in base_models):
        problems.append(f"{DNA_FILE} has no base_models list.")
        return
    for model in base_models:
        name = model.get("name")
        parts = Path(name).parts if isinstance(name, str) else ()
        # The name comes from the file being verified; never let it point outside models_root.
        if not parts or Path(name).is_absolute() or ".." in parts:
            problems.append(f"{DNA_FILE} lists a base model with an unusable name {name!r}.")
            continue
        if only is not None and name not in only:
            notes.append(f"base model {name} was not asked for; its hashes were not checked.")
            continue
        model_dir = models_root / name if models_root is not None else None
        if model_dir is None or not model_dir.is_dir():
            notes.append(f"base model {name} not present; its hashes were not checked.")
            continue
        _compare_base_model(name, model_dir, model, problems)


def _compare_base_model(
    name: str, model_dir: Path, recorded: Mapping[str, Any], problems: list[str]
) -> None:
    config = model_dir / "config.json"
    if not config.is_file():
        problems.append(f"base model {name}: {config} is missing.")
    elif sha256_file(config) != recorded.get("config_sha256"):
        problems.append(
            f"base model {name}: {config} differs from the config.json the run was trained on."
        )
    weights = recorded.get("weights")
    if not isinstance(weights, dict):
        problems.append(f"{DNA_FILE} records no weight hashes for base model {name}.")
        return
    actual = {path.name: path for path in weight_files(model_dir)}
    for filename in sorted(weights.keys() | actual.keys()):
        shown = model_dir / filename
        if filename not in actual:
            problems.append(f"base model {name}: {shown} is missing (the run was trained on it).")
        elif filename not in weights:
            problems.append(
                f"base model {name}: {shown} is a weight file the run was not trained on."
            )
        elif sha256_file(actual[filename]) != weights[filename]:
            problems.append(
                f"base model {name}: {shown} differs from the weights the run was trained on."
            )


def _check_proof(
    proof: dict[str, Any],
    dna: dict[str, Any] | None,
    trusted_public_key: str | None,
    problems: list[str],
) -> None:
    if proof.get("event") != PROOF_EVENT:
        problems.append(f"{PROOF_FILE} has event {proof.get('event')!r}, not {PROOF_EVENT!r}.")
    if proof.get("algorithm") != ALGORITHM:
        problems.append(
            f"{PROOF_FILE} has algorithm {proof.get('algorithm')!r}; proofs use {ALGORITHM!r}."
        )
    if dna is not None:
        for field in ("run_id", "dna", "immutable_hash"):
            if proof.get(field) != dna.get(field):
                problems.append(
                    f"{PROOF_FILE}: {field} {proof.get(field)!r} differs from {DNA_FILE}'s "
                    f"{dna.get(field)!r}."
                )
    _check_signature(PROOF_FILE, proof, "proof", trusted_public_key, problems)


def _check_signature(
    name: str,
    signed: Mapping[str, Any],
    what: str,
    trusted_public_key: str | None,
    problems: list[str],
) -> None:
    """The signature of `signed` (a file named `name`) holds, by the trusted key if one is
    given."""
    if not verify_proof_signature(signed):
        problems.append(
            f"{name}: the signature is not valid for its content and signer_public_key (the "
            f"{what} was changed after it was signed)."
        )
    _check_signer(name, signed, trusted_public_key, problems)


def _check_signer(
    name: str, signed: Mapping[str, Any], trusted_public_key: str | None, problems: list[str]
) -> None:
    if trusted_public_key is None:
        return
    trusted = _raw_public_key(trusted_public_key)
    signer = _raw_public_key(signed.get("signer_public_key"))
    if trusted is None:
        problem = (
            f"The trusted public key {trusted_public_key!r} is not a base64 raw Ed25519 "
            "key (32 bytes)."
        )
        if problem not in problems:
            problems.append(problem)
    elif signer != trusted:
        problems.append(
            f"{name} was signed by key {signed.get('signer_public_key')!r}, not by the "
            f"trusted key {trusted_public_key.strip()!r}."
        )


def _note_signer_and_ledger(
    proof: Mapping[str, Any], trusted_public_key: str | None, notes: list[str]
) -> None:
    if trusted_public_key is None:
        notes.append(
            f"The signature was checked against the key named in {PROOF_FILE} "
            f"({proof.get('signer_public_key')}); give the signer's public key as the trusted "
            "key to also check who signed."
        )
    ledger = proof.get("ledger")
    if ledger is None:
        notes.append("The proof was not posted to a ledger (LEDGER_URL was unset).")
    elif isinstance(ledger, dict) and ledger.get("entry_id") is not None:
        notes.append(
            f"Ledger entry {ledger.get('entry_id')} at {ledger.get('url')} is recorded; the "
            "ledger was not contacted and its receipt is not covered by the signature."
        )
    elif isinstance(ledger, dict) and ledger.get("error"):
        notes.append(f"Posting the proof to the ledger failed: {ledger.get('error')}")
    else:
        notes.append(f"The ledger field of {PROOF_FILE} is not a receipt oneseek writes.")


def _raw_public_key(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value.strip().encode("ascii"), validate=True)
    except (ValueError, binascii.Error):
        return None
    return raw if len(raw) == 32 else None
