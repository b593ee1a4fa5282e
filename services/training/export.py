"""One model of a certified run as a folder anyone loads as it is (`oneseek export`): the LoRA
merged into its base (or the run's full weights), or the adapter alone; its tokenizer; a Hugging
Face model card; and a signed manifest that carries the run's certificate, so `oneseek verify`
checks the export offline as it checks a run folder. `archive_chunks` streams such a folder
as one tar archive.

The export is written into a staging folder beside `out` and renamed into place at the end: a
failed export leaves nothing behind, and `out` never holds half a model.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.api.codec import format_timestamp, now_timestamp
from services.core.atomic import fsync_dir, write_bytes_atomic, write_json_atomic
from services.core.dna import hash_tree
from services.core.errors import ArtifactError, Conflict, InvalidInput, NotFound
from services.core.layout import (
    ADAPTERS_DIR,
    DNA_FILE,
    EXPORT_FORMAT,
    EXPORT_MANIFEST_FILE,
    EXPORT_SIGNATURE_FILE,
    MODEL_SIGNING_PUBLIC_KEY_FILE,
    PROOF_FILE,
)
from services.core.ledger import load_signing_key, public_key_b64, signed_payload
from services.core.model_signatures import ModelSigner, model_signer
from services.training.models import quiet_progress
from services.training.trained import (
    TrainedSource,
    choose_device,
    default_models_root,
    inference_precision,
    load_trained,
    locate,
    verify_source,
)

CARD_FILE = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_CHUNK = 1 << 20


def export_model(
    run_dir: Path,
    model: str,
    out: Path,
    *,
    merge: bool,
    models_root: Path | None = None,
    key_path: Path | None = None,
    model_signing_key_path: Path | None = None,
) -> Path:
    """Write `model` of the certified run in `run_dir` to the new folder `out`; returns `out`.

    - `merge` on a LoRA run: the adapter folded into the base weights, saved in float32 from
      the CPU. The sum is taken in float32, whose 24-bit mantissa keeps the small LoRA update
      that bf16 (8 bits) would round away, and a bf16 or fp16 base converts to float32 without
      loss: the merged model computes what base + adapter compute, up to float rounding. A
      4-bit (QLoRA) run is merged into its base dequantized from NF4 on a GPU, the weights its
      adapter was trained against; without CUDA it is refused.
    - no `merge` on a LoRA run: the adapter alone (PEFT), its adapter_config.json naming the
      base by its folder name.
    - a full fine-tune: the run's weights, byte for byte.

    Refused before anything is written: a run folder that does not verify (Conflict), a model
    the run lacks (NotFound), an `out` that is not new or empty, or lies inside the run folder
    (InvalidInput, field "out"). The manifest is signed with the ledger's key
    (`load_signing_key`); the folder also gets an OpenSSF model signature (`model.sig`, with
    `model_signing_public_key.pem`), made with the model-signing key (`model_signer`) over every
    file but itself and the manifest, which lists both in turn.
    """
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out, run_dir)
    source = locate(run_dir, model, models_root or default_models_root(run_dir), field="model")
    key = load_signing_key(key_path)
    signer = model_signer(model_signing_key_path)
    merging = source.lora and merge
    device = choose_device(source) if merging and source.four_bit else torch.device("cpu")
    if merging:
        verify_source(source, doing="it is not exported")  # the base too: merged into
    else:
        verify_source(source, needs_base=False, doing="it is not exported")
    staging = _staging(out)
    try:
        if not source.lora:
            certified, changed = _copy_full(source, staging)
        elif merge:
            certified, changed = _save_merged(source, staging, device)
        else:
            certified, changed = _copy_adapter(source, staging)
        _copy_certificate(source, staging)
        merged = merging or not source.lora
        (staging / CARD_FILE).write_text(model_card(source, merged=merged), encoding="utf-8")
        _sign_model(signer, staging)
        _sync_files(staging)
        manifest = _manifest(source, staging, merged=merged, certified=certified, changed=changed)
        _sign(manifest, key)
        write_json_atomic(staging / EXPORT_MANIFEST_FILE, manifest)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the export from everyone else
        _move_into_place(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise ArtifactError(
                f"Cannot write the export of {model!r} to {out}: {error.strerror or error}. "
                "Check free space and permissions there."
            ) from error
        raise
    return out


# ---- what is exported ------------------------------------------------------------------------


def _check_out(out: Path, run_dir: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InvalidInput(
            f"{out} exists and is not a folder; name a new (or empty) folder for the export.",
            field="out",
        )
    if out.is_dir() and any(out.iterdir()):
        raise InvalidInput(
            f"{out} exists and is not empty; name a new (or empty) folder: an export never "
            "writes over files.",
            field="out",
        )
    target, run = out.resolve(), run_dir.resolve()
    if target == run or run in target.parents:
        raise InvalidInput(
            f"{out} lies inside the run folder {run_dir}, which must stay as it was certified; "
            "export somewhere else.",
            field="out",
        )


def _staging(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    except OSError as error:
        raise InvalidInput(
            f"Cannot make the export folder {out}: {error.strerror or error}.", field="out"
        ) from error


def _recorded(source: TrainedSource) -> dict[str, str]:
    """The certified files of the model's adapters/<model>/ folder: relative path -> sha256."""
    adapters = source.dna.get("adapters")
    files = adapters.get(source.model) if isinstance(adapters, dict) else None
    if not isinstance(files, dict) or not files:
        raise Conflict(
            f"Run {source.run_id}'s {DNA_FILE} records no files for {source.model!r}.",
            field="runId",
        )
    return {str(name): str(digest) for name, digest in files.items()}


def _copy_certified(source: TrainedSource, name: str, staging: Path) -> str:
    """Copy one certified file of adapters/<model>/ into the export, checking the copy's hash
    against the DNA (the file could change after the run folder verified); returns where it
    came from in the run folder."""
    origin = f"{ADAPTERS_DIR}/{source.model}/{name}"
    target = staging / name
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = _copy_hashing(source.adapter_dir / name, target)
    if digest != _recorded(source)[name]:
        raise Conflict(
            f"Run {source.run_id}: {origin} changed while it was exported (sha256 {digest}, "
            f"{DNA_FILE} records {_recorded(source)[name]}); it is not exported.",
            field="runId",
        )
    return origin


def _copy_full(source: TrainedSource, staging: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A full fine-tune's folder (config, weights, tokenizer), byte for byte."""
    certified = {
        name: _copy_certified(source, name, staging)
        for name in _recorded(source)
        if name != CARD_FILE
    }
    return certified, {}


def _copy_adapter(source: TrainedSource, staging: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The adapter and tokenizer files; adapter_config.json names the base by its folder name
    instead of the path it had on the training machine."""
    certified: dict[str, str] = {}
    for name in _recorded(source):
        if name == CARD_FILE:  # PEFT's blank template; the export's card replaces it
            continue
        certified[name] = _copy_certified(source, name, staging)
    config_path = staging / ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = source.model
    # PEFT's own form (indented, sorted), so the file reads as PEFT wrote it
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    del certified[ADAPTER_CONFIG]
    changed = {
        ADAPTER_CONFIG: f"base_model_name_or_path set to {source.model!r}, the base model's "
        "folder name; the rest as certified"
    }
    return certified, changed


def _save_merged(
    source: TrainedSource, staging: Path, device: torch.device
) -> tuple[dict[str, str], dict[str, str]]:
    """The adapter merged into its base, saved in float32 (safetensors), and the tokenizer."""
    if source.four_bit:
        model = _merged_from_4bit(source, device)
    else:
        cpu = torch.device("cpu")
        model = load_trained(source, merge=True, device=cpu, precision="fp32", verify=False).model
    with quiet_progress():
        model.save_pretrained(staging)
    certified = {
        name: _copy_certified(source, name, staging)
        for name in _recorded(source)
        if name not in (CARD_FILE, ADAPTER_CONFIG, *ADAPTER_WEIGHTS)
        and not (staging / name).exists()
    }
    return certified, {}


def _merged_from_4bit(source: TrainedSource, device: torch.device) -> Any:
    """The base in NF4 on the GPU, dequantized (the weights the adapter was trained against),
    moved to the CPU in float32, with the adapter merged in."""
    from peft import PeftModel

    from services.training.models import BaseModelInfo, load_model
    from services.training.precision import DTYPES

    info = BaseModelInfo(
        name=source.model,
        path=source.base_dir,
        architecture=str(source.base_model.get("architecture", "")),
        model_type="",
        parameter_count=0,
    )
    dtype = DTYPES[inference_precision(source, device)]
    base: Any = load_model(info, device, dtype, four_bit=True)
    base = base.dequantize()
    base = base.to(torch.device("cpu"), torch.float32)
    torch.cuda.empty_cache()
    with quiet_progress():
        model: Any = PeftModel.from_pretrained(base, source.adapter_dir, is_trainable=False)
    return model.merge_and_unload()


def _copy_certificate(source: TrainedSource, staging: Path) -> None:
    """The run's DNA and signed proof, as they are in the run folder: the DNA must be the one
    the run folder verified with."""
    for name in (DNA_FILE, PROOF_FILE):
        data = (source.run_dir / name).read_bytes()
        if name == DNA_FILE and json.loads(data) != source.dna:
            raise Conflict(
                f"Run {source.run_id}: {DNA_FILE} changed while it was exported; it is not "
                "exported.",
                field="runId",
            )
        write_bytes_atomic(staging / name, data)


def _manifest(
    source: TrainedSource,
    staging: Path,
    *,
    merged: bool,
    certified: Mapping[str, str],
    changed: Mapping[str, str],
) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "format": EXPORT_FORMAT,
        "run_id": source.run_id,
        "model": source.model,
        "method": "lora" if source.lora else "full",
        "merged": merged,
        "dtype": "float32" if merged and source.lora else None,
        "dna": source.dna.get("dna"),
        "immutable_hash": source.dna.get("immutable_hash"),
        "base_model": source.base_model,
        "exported_at": format_timestamp(now_timestamp()),
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "files": hash_tree(staging),
        "certified_files": dict(sorted(certified.items())),
        "changed_files": dict(sorted(changed.items())),
        "algorithm": "ed25519",
        "signer_public_key": None,
        "signature": None,
    }


def _sign(manifest: dict[str, Any], key: Ed25519PrivateKey) -> None:
    """Ed25519 over the canonical JSON of every field but `signature`, as a ledger proof is
    signed (so `verify_proof_signature` checks both)."""
    manifest["signer_public_key"] = public_key_b64(key)
    manifest["signature"] = base64.b64encode(key.sign(signed_payload(manifest))).decode("ascii")


def _sign_model(signer: ModelSigner, staging: Path) -> None:
    """The OpenSSF model signature of the export: every file but the signature itself and the
    manifest (written after it, and listing it); both are recorded in the signature as ignored,
    so the stock `model_signing verify key` skips them too. The folder's name is not signed."""
    (staging / MODEL_SIGNING_PUBLIC_KEY_FILE).write_bytes(signer.public_key_pem)
    ignored = (EXPORT_SIGNATURE_FILE, EXPORT_MANIFEST_FILE)
    signer.sign(staging, staging / EXPORT_SIGNATURE_FILE, ignore=ignored)


def _copy_hashing(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


def _sync_files(folder: Path) -> None:
    """Every file of the export on disk before the rename publishes it."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(path)


def _move_into_place(staging: Path, out: Path) -> None:
    try:
        os.rename(staging, out)  # replaces an empty `out`, refuses one that filled meanwhile
    except OSError as error:
        if out.exists():
            raise InvalidInput(
                f"{out} was filled while the export was written; name a new folder.",
                field="out",
            ) from error
        raise
    fsync_dir(out.parent)


# ---- the model card --------------------------------------------------------------------------


def model_card(source: TrainedSource, *, merged: bool) -> str:
    """A Hugging Face model card (README.md): YAML metadata, then what was trained, how, how
    well, its provenance, and how to load it."""
    results, config = source.results, source.results.get("config") or {}
    name, dataset = source.model, results.get("dataset") or {}
    lora, adapter_only = source.lora, source.lora and not merged
    base = source.base_model
    tags = ["oneseek", "fine-tuned", "lora" if lora else "full-fine-tune"]
    if source.four_bit:
        tags.append("qlora")
    if lora and merged:
        tags.append("merged")
    model_type = next(
        (str(m.get("model_type")) for m in results.get("base_models") or () if _is(m, name)), ""
    )
    if model_type:
        tags.append(model_type)
    meta = {
        "base_model": name,
        "base_model_relation": "adapter" if adapter_only else "finetune",
        "library_name": "peft" if adapter_only else "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
        "datasets": [str(dataset.get("id", config.get("dataset_id", "")))],
    }
    what = (
        "the LoRA adapter alone (PEFT); the base model is not included"
        if adapter_only
        else "the LoRA adapter merged into the base weights (float32, safetensors)"
        if lora
        else "the full fine-tuned weights, as the run saved them"
    )
    best = (results.get("best_epochs") or {}).get(name) or {}
    lines = [
        "---",
        *_yaml(meta),
        "---",
        "",
        f"# {name}, fine-tuned by OneSeek run {source.run_id}",
        "",
        f"The base model `{name}` ({base.get('architecture') or model_type or 'causal LM'}) "
        f"fine-tuned {'with LoRA' if lora else 'in full'} on the dataset "
        f"`{dataset.get('id', '?')}` ({_records(dataset)}) by OneSeek run `{source.run_id}`"
        f"{_others(source)}. This folder holds {what}, from epoch "
        f"{best.get('epoch', '?')}, the epoch of its lowest validation loss, and its tokenizer.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in _settings(source)),
        "",
        "## Results",
        "",
        *_results(source),
        "",
        "## Provenance",
        "",
        *_provenance(source),
        "",
        "## Usage",
        "",
        *_usage(source, adapter_only),
        "",
    ]
    return "\n".join(lines)


def _is(entry: Any, name: str) -> bool:
    return isinstance(entry, dict) and entry.get("name") == name


def _yaml(meta: Mapping[str, Any]) -> list[str]:
    """YAML of flat keys with string or string-list values; every string double-quoted (JSON
    strings are YAML double-quoted scalars), so no name can break the front matter."""
    lines: list[str] = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(str(item))}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(str(value))}")
    return lines


def _records(dataset: Mapping[str, Any]) -> str:
    records, train = dataset.get("records"), dataset.get("train_records")
    held = dataset.get("validation_records")
    if records is None:
        return "records not recorded"
    return f"{records} records: {train} trained on, {held} held out for validation"


def _others(source: TrainedSource) -> str:
    names = [
        str(m.get("name"))
        for m in source.results.get("base_models") or ()
        if isinstance(m, dict) and m.get("name") != source.model
    ]
    return "" if not names else ", side by side with " + ", ".join(f"`{n}`" for n in names)


def _settings(source: TrainedSource) -> list[tuple[str, str]]:
    results, config = source.results, source.results.get("config") or {}
    placement: dict[str, Any] = next(
        (p for p in results.get("placement") or () if _model_is(p, source)), {}
    )
    method = (
        f"LoRA (rank {config.get('lora_rank')}, alpha {config.get('lora_alpha')}, dropout "
        f"{config.get('lora_dropout')})"
        if source.lora
        else "full fine-tune"
    )
    precision = str(config.get("precision", "?"))
    if placement.get("precision") and placement.get("precision") != precision:
        precision += f" ({placement.get('precision')} on {placement.get('device', '?')})"
    elif placement.get("device"):
        precision += f" (on {placement.get('device')})"
    rows = [
        ("method", method),
        ("epochs", f"{results.get('epochs_run', '?')} run of {results.get('total_epochs', '?')} "
         f"planned ({results.get('stop_reason', 'stop reason not recorded')})"),
        ("learning rate", f"{config.get('learning_rate')} (the base; adaptive weights scale "
         "it per epoch, see below)"),
        ("batch size", str(config.get("batch_size"))),
        ("max sequence length", f"{config.get('max_seq_length')} tokens"),
        ("precision", precision),
        ("seed", str(config.get("seed"))),
        ("validation split", str(config.get("validation_split"))),
    ]  # fmt: skip
    if source.four_bit:
        rows.insert(2, ("quantization", "4-bit NF4 base (QLoRA)"))
    return rows


def _model_is(entry: Any, source: TrainedSource) -> bool:
    return isinstance(entry, dict) and entry.get("model") == source.model


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "—"


def _results(source: TrainedSource) -> list[str]:
    results, name = source.results, source.model
    history = [h for h in results.get("history") or () if isinstance(h, dict)]
    best = (results.get("best_epochs") or {}).get(name) or {}
    final = (results.get("final_val_losses") or {}).get(name)
    last = history[-1].get("epoch", len(history)) if history else "?"
    run_best = results.get("best_model")
    lines = [
        "| validation loss | epoch | value |",
        "|---|---|---|",
        f"| final | {last} | {_loss(final)} |",
        f"| best (these weights) | {best.get('epoch', '?')} | {_loss(best.get('val_loss'))} |",
        "",
        f"The run's best model was `{run_best}`."
        if run_best and run_best != name
        else "This was the run's best model.",
        "",
        "### Adaptive weights",
        "",
        "After each epoch the models were ranked by validation loss; the best one's weight (its "
        "learning-rate multiplier) went up, the worst one's down, normalised to a mean of 1.",
        "",
        "| epoch | train loss | validation loss | rank | weight during the epoch | weight after "
        "| learning rate next |",
        "|---|---|---|---|---|---|---|",
    ]
    adjustments = {
        a.get("epoch"): a for a in results.get("weight_adjustments") or () if isinstance(a, dict)
    }
    for entry in history:
        epoch = entry.get("epoch")
        change = adjustments.get(epoch) or {}
        ranking = list(change.get("ranking") or ())
        rank = f"{ranking.index(name) + 1} of {len(ranking)}" if name in ranking else "—"
        during = (change.get("previous_weights") or {}).get(name)
        after = (entry.get("weights") or {}).get(name)
        rate = (change.get("applied_lrs") or {}).get(name)
        cells = [
            str(epoch),
            _loss((entry.get("train_losses") or {}).get(name)),
            _loss((entry.get("val_losses") or {}).get(name)),
            rank,
            f"{during:.3f}" if isinstance(during, (int, float)) else "—",
            f"{after:.3f}" if isinstance(after, (int, float)) else "—",
            f"{rate:.3g}" if isinstance(rate, (int, float)) else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _provenance(source: TrainedSource) -> list[str]:
    dna = source.dna
    base = source.base_model
    weights: dict[str, Any] = base["weights"] if isinstance(base.get("weights"), dict) else {}
    return [
        f"- DNA: `{dna.get('dna')}`",
        f"- immutable hash: `{dna.get('immutable_hash')}`",
        f"- base model `{source.model}`: config.json sha256 `{base.get('config_sha256')}`"
        + "".join(f", {file} sha256 `{digest}`" for file, digest in sorted(weights.items())),
        f"- dataset `{(source.results.get('dataset') or {}).get('id')}`: sha256 "
        f"`{(source.results.get('dataset') or {}).get('sha256')}`",
        "",
        f"`{DNA_FILE}` and `{PROOF_FILE}` are the run's certificate, copied as they are: the "
        "DNA (hashes of the base model, the dataset, the trained files and the config) and its "
        f"Ed25519 signature. `{EXPORT_MANIFEST_FILE}` records the sha256 of every file here, "
        "which of them are the run's certified files byte for byte, and is signed with the same "
        "key. Check all of it, offline:",
        "",
        "```sh",
        "oneseek verify <this folder>",
        "```",
        "",
        f"`{EXPORT_SIGNATURE_FILE}` is an OpenSSF model signature (the `model-signing` package) "
        f"of every file here but itself and `{EXPORT_MANIFEST_FILE}`, made with the EC key whose "
        f"public half is `{MODEL_SIGNING_PUBLIC_KEY_FILE}`; the stock command checks it:",
        "",
        "```sh",
        f"model_signing verify key --signature <this folder>/{EXPORT_SIGNATURE_FILE} "
        f"--public_key <this folder>/{MODEL_SIGNING_PUBLIC_KEY_FILE} <this folder>",
        "```",
    ]


def _usage(source: TrainedSource, adapter_only: bool) -> list[str]:
    load = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
    ]
    if adapter_only:
        return [
            *load[:2],
            "from peft import PeftModel",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("path/to/{source.model}")',
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            *_generate_lines(),
            "```",
            "",
            f"`adapter_config.json` names the base `{source.model}`, its folder name: run from "
            f"the folder that holds `{source.model}/` and `AutoModelForCausalLM` (with peft "
            "installed) or `AutoPeftModelForCausalLM` load this folder alone. Editing that "
            "name makes `oneseek verify` report the file as changed; pass the base to "
            "`PeftModel.from_pretrained` as above instead."
            + (
                " The adapter was trained on the base quantized to 4-bit NF4: load the base with "
                "the same `BitsAndBytesConfig` for exactly the behaviour it was trained with."
                if source.four_bit
                else ""
            ),
        ]
    return [
        *load,
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        *_generate_lines(),
        "```",
    ]


def _generate_lines() -> list[str]:
    return [
        'inputs = tokenizer("Your prompt", return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], '
        "skip_special_tokens=True))",
    ]


# ---- streaming a folder as a tar archive -----------------------------------------------------


def archive_chunks(folder: Path, chunk_size: int = _CHUNK) -> Iterator[bytes]:
    """`folder` as one uncompressed tar archive (POSIX pax; its top-level folder named after
    `folder`), in chunks of `chunk_size` bytes (the last one shorter), made as they are read:
    nothing is built in memory or on disk, so a 14 GB export streams in a few MB.

    tarfile's `addfile` copies a whole member in one call; here tarfile makes each header and
    the member's bytes follow in chunks. Symlinks and special files are refused, and a file
    that changes size while it is read fails the stream rather than corrupt it.
    """
    folder = Path(folder)
    if chunk_size < 1:
        raise InvalidInput(f"chunk_size must be at least 1, got {chunk_size}.", field="chunk_size")
    if folder.is_symlink() or not folder.is_dir():
        raise NotFound(f"{folder} is not a folder to archive.", field="path")
    return _archive(folder, chunk_size)


def _archive(folder: Path, chunk_size: int) -> Iterator[bytes]:
    pending = bytearray()
    written = 0

    def put(data: bytes) -> Iterator[bytes]:
        nonlocal written
        pending.extend(data)
        written += len(data)
        while len(pending) >= chunk_size:
            yield bytes(pending[:chunk_size])
            del pending[:chunk_size]

    for path, arcname in _members(folder):
        stat = path.lstat()
        info = tarfile.TarInfo(arcname)
        info.mtime = int(stat.st_mtime)
        if path.is_dir():
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            yield from put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            continue
        info.size, info.mode = stat.st_size, 0o644
        yield from put(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        left = info.size
        with open(path, "rb") as reader:
            while left:
                data = reader.read(min(chunk_size, left))
                if not data:
                    break
                left -= len(data)
                yield from put(data)
            if left or reader.read(1):
                raise Conflict(f"{path} changed while it was archived; archive it again.")
        yield from put(tarfile.NUL * (-info.size % tarfile.BLOCKSIZE))
    yield from put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # the end-of-archive marker
    yield from put(tarfile.NUL * (-written % tarfile.RECORDSIZE))
    if pending:
        yield bytes(pending)


def _members(folder: Path) -> Iterator[tuple[Path, str]]:
    """The folder, then everything under it in name order, each with its name in the archive."""
    yield folder, folder.name
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        here = Path(root)
        for name in sorted([*dirs, *files]):
            path = here / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise InvalidInput(
                    f"{path} is a symlink or a special file; an archived folder holds only "
                    "regular files and folders.",
                    field="path",
                )
            yield path, f"{folder.name}/{path.relative_to(folder).as_posix()}"
