"""The DNA fingerprint: file hashes, model fingerprints, and what the dna string depends on."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.core.atomic import json_bytes, write_json_atomic
from services.core.dna import (
    DNA_VERSION,
    build_dna,
    compute_dna_string,
    compute_immutable_hash,
    hash_tree,
    model_fingerprint,
    sha256_file,
    write_dna,
)
from services.core.errors import InvalidInput, NotFound

RUN_ID = "run-20240102-030405"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _base_model(root: Path, name: str, weight_file: str, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    folder = root / name
    _write(folder / "config.json", json.dumps({"model_type": name, "seed": seed}).encode())
    _write(folder / weight_file, rng.randbytes(2048))
    _write(folder / "tokenizer.json", b'{"version": "1.0"}')
    return model_fingerprint(name, folder, f"{name.title()}ForCausalLM")


def _run_folder(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    rng = random.Random(7)
    run_dir = tmp_path / "oneseek-certified" / RUN_ID
    for model in ("alpha", "beta"):
        _write(run_dir / "adapters" / model / "adapter_config.json", b'{"r": 8}\n')
        _write(run_dir / "adapters" / model / "adapter_model.safetensors", rng.randbytes(3000))
    write_json_atomic(run_dir / "live_metrics.json", {"epoch": 2, "total_loss": 1.25})
    write_json_atomic(run_dir / "training_results.json", {"status": "completed", "epochs": 2})
    inputs: dict[str, Any] = {
        "run_id": RUN_ID,
        "created_at": "2024-01-02T03:04:05+00:00",
        "base_models": [
            _base_model(tmp_path / "models", "alpha", "model.safetensors", 1),
            _base_model(tmp_path / "models", "beta", "pytorch_model.bin", 2),
        ],
        "dataset": {"id": "sample", "sha256": _sha(b"dataset"), "records": 10},
        "run_dir": run_dir,
        "final_weights": {"alpha": 1.3, "beta": 0.7},
        "training_config": {"epochs": 2, "learning_rate": 0.0001, "seed": 42},
    }
    return run_dir, inputs


def test_sha256_file_streams_files_larger_than_one_chunk(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(2 * (1 << 20) + 12345)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == _sha(data)


def test_hash_tree_lists_every_file_by_posix_path_sorted(tmp_path: Path) -> None:
    files = {"b.bin": b"b", "a/z.txt": b"z", "a/deeper/x.json": b"{}", "c": b""}
    for relpath, data in files.items():
        _write(tmp_path / relpath, data)
    (tmp_path / "empty-folder").mkdir()
    tree = hash_tree(tmp_path)
    assert list(tree) == sorted(files)
    assert tree == {relpath: _sha(data) for relpath, data in files.items()}


@pytest.mark.parametrize("link_kind", ["file", "folder"])
def test_hash_tree_refuses_symlinks(tmp_path: Path, link_kind: str) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    _write(outside / "secret.bin", b"secret")
    _write(root / "real.bin", b"real")
    target = outside if link_kind == "folder" else outside / "secret.bin"
    (root / "link").symlink_to(target)
    with pytest.raises(InvalidInput, match="link is a symlink"):
        hash_tree(root)


def test_hash_tree_of_a_missing_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        hash_tree(tmp_path / "nope")


def test_model_fingerprint_hashes_config_and_weight_files_only(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _write(folder / "config.json", b'{"a": 1}')
    _write(folder / "model-00001-of-00002.safetensors", b"w1")
    _write(folder / "model-00002-of-00002.safetensors", b"w2")
    _write(folder / "pytorch_model.bin", b"w3")
    _write(folder / "model.safetensors.index.json", b"{}")
    _write(folder / "tokenizer.json", b"{}")
    fingerprint = model_fingerprint("m", folder, "LlamaForCausalLM")
    assert fingerprint == {
        "name": "m",
        "architecture": "LlamaForCausalLM",
        "config_sha256": _sha(b'{"a": 1}'),
        "weights": {
            "model-00001-of-00002.safetensors": _sha(b"w1"),
            "model-00002-of-00002.safetensors": _sha(b"w2"),
            "pytorch_model.bin": _sha(b"w3"),
        },
    }


def test_model_fingerprint_names_what_is_missing(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _write(folder / "model.safetensors", b"w")
    with pytest.raises(NotFound, match=r"config\.json"):
        model_fingerprint("m", folder, "X")
    (folder / "model.safetensors").unlink()
    _write(folder / "config.json", b"{}")
    with pytest.raises(NotFound, match="no weight files"):
        model_fingerprint("m", folder, "X")


def test_build_dna_hashes_adapters_and_artifacts(tmp_path: Path) -> None:
    run_dir, inputs = _run_folder(tmp_path)
    doc = build_dna(**inputs)
    assert list(doc) == [
        "version",
        "run_id",
        "created_at",
        "base_models",
        "dataset",
        "adapters",
        "artifacts",
        "final_weights",
        "training_config",
        "dna",
        "immutable_hash",
    ]
    assert doc["version"] == DNA_VERSION
    assert set(doc["adapters"]) == {"alpha", "beta"}
    assert doc["adapters"]["beta"]["adapter_model.safetensors"] == sha256_file(
        run_dir / "adapters" / "beta" / "adapter_model.safetensors"
    )
    assert doc["artifacts"] == {
        "live_metrics.json": sha256_file(run_dir / "live_metrics.json"),
        "training_results.json": sha256_file(run_dir / "training_results.json"),
    }
    assert re.fullmatch(r"dna-v2:[0-9a-f]{32}", doc["dna"])
    rest = {k: v for k, v in doc.items() if k != "immutable_hash"}
    expected = hashlib.sha256(
        json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert doc["immutable_hash"] == expected


def test_write_dna_writes_the_on_disk_form_and_hashes_survive_reading_back(
    tmp_path: Path,
) -> None:
    run_dir, inputs = _run_folder(tmp_path)
    doc = build_dna(**inputs)
    path = write_dna(run_dir, doc)
    assert path == run_dir / "oneseek_dna.json"
    assert path.read_bytes() == json_bytes(doc)
    back = json.loads(path.read_bytes())
    assert compute_immutable_hash(back) == doc["immutable_hash"]
    assert compute_dna_string(back) == doc["dna"]


def test_write_dna_refuses_a_document_that_does_not_match_its_hashes(tmp_path: Path) -> None:
    run_dir, inputs = _run_folder(tmp_path)
    doc = build_dna(**inputs)
    edited = {**doc, "created_at": "2030-01-01T00:00:00+00:00"}
    with pytest.raises(InvalidInput, match="immutable_hash"):
        write_dna(run_dir, edited)
    edited = {**doc, "final_weights": {"alpha": 1.0, "beta": 1.0}}
    with pytest.raises(InvalidInput, match="dna string"):
        write_dna(run_dir, edited)
    assert not (run_dir / "oneseek_dna.json").exists()


def _set_in(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("final_weights", "alpha"), 1.3000000000000003),
        (("training_config", "epochs"), 3),
        (("dataset", "sha256"), _sha(b"other dataset")),
        (("adapters", "alpha", "adapter_config.json"), _sha(b"other adapter")),
        (("base_models", 0, "config_sha256"), _sha(b"other config")),
        (("base_models", 1, "weights", "pytorch_model.bin"), _sha(b"other weights")),
    ],
)
def test_dna_string_changes_with_what_was_trained(
    tmp_path: Path, path: tuple[Any, ...], value: Any
) -> None:
    _, inputs = _run_folder(tmp_path)
    doc = build_dna(**inputs)
    edited = copy.deepcopy(doc)
    _set_in(edited, path, value)
    assert compute_dna_string(edited) != doc["dna"]
    assert compute_immutable_hash(edited) != doc["immutable_hash"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("run_id",), "run-20990101-000000"),
        (("created_at",), "2099-01-01T00:00:00+00:00"),
        (("artifacts", "live_metrics.json"), _sha(b"other metrics")),
        (("dataset", "id"), "renamed"),
        (("base_models", 0, "architecture"), "OtherForCausalLM"),
    ],
)
def test_dna_string_ignores_names_and_times_but_immutable_hash_does_not(
    tmp_path: Path, path: tuple[Any, ...], value: Any
) -> None:
    _, inputs = _run_folder(tmp_path)
    doc = build_dna(**inputs)
    edited = copy.deepcopy(doc)
    _set_in(edited, path, value)
    assert compute_dna_string(edited) == doc["dna"]
    assert compute_immutable_hash(edited) != doc["immutable_hash"]


def test_dna_string_does_not_depend_on_base_model_order(tmp_path: Path) -> None:
    _, inputs = _run_folder(tmp_path)
    doc = build_dna(**inputs)
    swapped = {**doc, "base_models": list(reversed(doc["base_models"]))}
    assert compute_dna_string(swapped) == doc["dna"]


def _reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reverse_keys(item) for item in value]
    return value


def test_hashes_do_not_depend_on_key_order(tmp_path: Path) -> None:
    _, inputs = _run_folder(tmp_path)
    doc = build_dna(**inputs)
    reordered = _reverse_keys(doc)
    assert list(reordered) != list(doc)
    assert compute_immutable_hash(reordered) == doc["immutable_hash"]
    assert compute_dna_string(reordered) == doc["dna"]


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(
    doc=st.dictionaries(st.text(max_size=6), _json_values, min_size=1, max_size=6),
    seed=st.integers(0, 2**32),
)
def test_immutable_hash_is_the_same_for_any_key_order(doc: dict[str, Any], seed: int) -> None:
    keys = list(doc)
    random.Random(seed).shuffle(keys)
    shuffled = {key: doc[key] for key in keys}
    assert compute_immutable_hash(shuffled) == compute_immutable_hash(doc)
    # ...and the JSON the file holds hashes the same as the object it was written from.
    assert compute_immutable_hash(json.loads(json_bytes(doc))) == compute_immutable_hash(doc)


@settings(max_examples=60, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=6), _json_values, min_size=1, max_size=6))
def test_immutable_hash_ignores_only_its_own_field(doc: dict[str, Any]) -> None:
    with_hash = {**doc, "immutable_hash": "anything"}
    assert compute_immutable_hash(with_hash) == compute_immutable_hash(
        {k: v for k, v in doc.items() if k != "immutable_hash"}
    )
    extended = {**doc, "\x00key longer than any generated": 0}
    assert compute_immutable_hash(extended) != compute_immutable_hash(doc)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0"])
def test_build_dna_refuses_final_weights_that_are_not_finite_numbers(
    tmp_path: Path, bad: Any
) -> None:
    _, inputs = _run_folder(tmp_path)
    inputs["final_weights"] = {"alpha": bad, "beta": 1.0}
    with pytest.raises(InvalidInput, match=r"final_weights\['alpha'\]") as caught:
        build_dna(**inputs)
    assert caught.value.field == "final_weights"


@pytest.mark.parametrize("run_id", ["run-2024-01-02", "../run-20240102-030405", ""])
def test_build_dna_refuses_a_malformed_run_id(tmp_path: Path, run_id: str) -> None:
    _, inputs = _run_folder(tmp_path)
    inputs["run_id"] = run_id
    with pytest.raises(InvalidInput, match="run-YYYYMMDD-HHMMSS") as caught:
        build_dna(**inputs)
    assert caught.value.field == "run_id"


def test_build_dna_refuses_a_file_loose_in_adapters(tmp_path: Path) -> None:
    run_dir, inputs = _run_folder(tmp_path)
    _write(run_dir / "adapters" / "stray.bin", b"x")
    with pytest.raises(InvalidInput, match=r"stray\.bin lies outside a model folder"):
        build_dna(**inputs)


@pytest.mark.parametrize("missing", ["live_metrics.json", "training_results.json", "adapters"])
def test_build_dna_needs_the_files_the_trainer_writes_first(tmp_path: Path, missing: str) -> None:
    run_dir, inputs = _run_folder(tmp_path)
    target = run_dir / missing
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(NotFound, match=re.escape(missing)):
        build_dna(**inputs)


def test_build_dna_refuses_a_dataset_without_a_sha256(tmp_path: Path) -> None:
    _, inputs = _run_folder(tmp_path)
    inputs["dataset"] = {"id": "sample", "sha256": "not-a-hash"}
    with pytest.raises(InvalidInput, match=r"dataset\.sha256"):
        build_dna(**inputs)
