"""The `oneseek` command as people use it: train, verify, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import main
from tests.conftest import IsolatedEnv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(isolated_env: IsolatedEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> IsolatedEnv:
    """isolated_env plus a datasets dir with a small copy of the sample and a broken file."""
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    lines = (REPO / "datasets" / "sample.jsonl").read_text().splitlines()
    (datasets / "small.jsonl").write_text("\n".join(lines[:60]) + "\n")
    (datasets / "broken.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n{not json\n")
    monkeypatch.setenv("DATASETS_DIR", str(datasets))
    return IsolatedEnv(isolated_env.models_dir, datasets, isolated_env.state_dir)


def certified(env: IsolatedEnv) -> list[Path]:
    root = env.models_dir / "oneseek-certified"
    return sorted(root.iterdir()) if root.exists() else []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--models", "", "--dataset", "small"], "No base models selected"),
        (["--models", "tiny-llama,nope", "--dataset", "small"], "nope"),
        (["--models", "tiny-llama,tiny-llama", "--dataset", "small"], "tiny-llama"),
        (["--models", "../tiny-llama", "--dataset", "small"], "not valid"),
        (["--models", "tiny-llama", "--dataset", "missing"], "missing"),
        (["--models", "tiny-llama", "--dataset", "broken"], "line 3"),
        (["--models", "tiny-llama", "--dataset", "small", "--epochs", "0"], "--epochs must be"),
        (
            ["--models", "tiny-llama", "--dataset", "small", "--learning-rate", "-1"],
            "--learning-rate must be",
        ),
        (["--models", "tiny-llama", "--dataset", "small", "--method", "qlora"], "--method must be"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_folder(
    env: IsolatedEnv, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert expected in err
    assert certified(env) == []


def test_unknown_model_lists_the_available_ones(
    env: IsolatedEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--models", "nope", "--dataset", "small"]) == 2
    err = capsys.readouterr().err
    assert "tiny-llama" in err and "tiny-gpt2" in err


def test_train_then_verify_then_tamper(env: IsolatedEnv) -> None:
    """The real console script, as a person runs it."""
    oneseek = Path(sys.executable).parent / "oneseek"
    command = [str(oneseek), "train", "--models", "tiny-llama,tiny-gpt2", "--dataset", "small"]
    command += ["--epochs", "10", "--auto-stop-threshold", "10", "--auto-stop-patience", "1"]
    command += ["--min-epochs", "2", "--learning-rate", "0.001"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    run_id, run_dir = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert Path(run_dir) == env.models_dir / "oneseek-certified" / run_id
    results = json.loads((Path(run_dir) / "training_results.json").read_text())
    assert results["status"] == "auto_stopped" and results["epochs_run"] == 2

    verify = [str(oneseek), "verify", run_dir]
    ok = subprocess.run(verify, capture_output=True, text=True, check=False, timeout=120)
    assert ok.returncode == 0 and "verified" in ok.stdout

    adapter = Path(run_dir) / "adapters" / "tiny-gpt2" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0x01
    adapter.write_bytes(bytes(data))
    bad = subprocess.run(verify, capture_output=True, text=True, check=False, timeout=120)
    assert bad.returncode == 1
    assert "adapter_model.safetensors" in bad.stdout and "NOT verified" in bad.stdout


def test_verify_refuses_a_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_base_models_env_is_read_only_without_the_flag(
    env: IsolatedEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BASE_MODELS", raising=False)
    assert main(["train", "--dataset", "small"]) == 2
    assert "No base models selected" in capsys.readouterr().err
    monkeypatch.setenv("BASE_MODELS", "from-env")
    assert main(["train", "--dataset", "small"]) == 2
    assert "from-env" in capsys.readouterr().err
    assert main(["train", "--models", "from-flag", "--dataset", "small"]) == 2
    err = capsys.readouterr().err
    assert "from-flag" in err and "from-env" not in err


def test_a_model_that_fails_to_load_is_bad_input_and_leaves_no_folder(
    env: IsolatedEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """Discovery accepts the folder (config, weights, tokenizer all there); loading fails."""
    broken = env.models_dir / "tiny-wrong-shape"
    broken.mkdir()
    source = env.models_dir / "tiny-llama"
    for item in source.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] *= 2  # the stored weights no longer fit
    (broken / "config.json").write_text(json.dumps(config))
    assert main(["train", "--models", "tiny-wrong-shape", "--dataset", "small"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "tiny-wrong-shape" in err and "\n" not in err
    assert certified(env) == []


def test_service_commands_take_the_tls_flags() -> None:
    from services.cli import build_parser

    parser = build_parser()
    training = parser.parse_args(["training-service", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert (training.tls_cert, training.tls_key) == ("c.pem", "k.pem")
    metrics = parser.parse_args(
        ["metrics-service", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"]
    )
    assert (metrics.tls_cert, metrics.tls_key, metrics.tls_ca) == ("c.pem", "k.pem", "ca.pem")
    assert parser.parse_args(["gateway", "--tls-ca", "ca.pem"]).tls_ca == "ca.pem"


def test_the_generation_cache_bound_is_a_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli import build_parser
    from services.training.server import _gib

    monkeypatch.delenv("ONESEEK_GENERATE_CACHE_GIB", raising=False)
    assert build_parser().parse_args(["training-service"]).generate_cache_gib is None
    given = build_parser().parse_args(["training-service", "--generate-cache-gib", "1.5"])
    assert _gib(given.generate_cache_gib) == int(1.5 * 1024**3)
    monkeypatch.setenv("ONESEEK_GENERATE_CACHE_GIB", "8")
    assert build_parser().parse_args(["training-service"]).generate_cache_gib == 8.0
    for bad in ("0", "-1", "lots", "inf"):
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(["training-service", "--generate-cache-gib", bad])
        assert caught.value.code == 2
        assert "--generate-cache-gib: must be a number above 0" in capsys.readouterr().err


def test_an_unreadable_tls_ca_is_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ONESEEK_TLS_CA", raising=False)
    missing = tmp_path / "ca.pem"
    assert main(["gateway", "--port", "0", "--tls-ca", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--tls-ca" in err and str(missing) in err


# ---- using what was trained: export, verify an export, generate --------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> Iterator[Path]:
    """A LoRA run of tiny-llama and tiny-gpt2, one epoch, in its own MODELS_DIR."""
    from tests.training.test_export import train

    root = tmp_path_factory.mktemp("cli-run")
    models = root / "models"
    models.mkdir()
    for name in ("tiny-llama", "tiny-gpt2"):
        (models / name).symlink_to(demo_models_dir / name, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONESEEK_STATE_DIR", str(root / "var"))
        patch.delenv("LEDGER_URL", raising=False)
        patch.delenv("LEDGER_PRIVATE_KEY_PATH", raising=False)
        patch.delenv("MODELS_DIR", raising=False)
        yield train(models, "run-20260302-000001", ["tiny-llama", "tiny-gpt2"], "lora")


def test_export_then_verify_the_export(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tiny-llama-merged"
    assert (
        main(["export", str(trained_run), "--model", "tiny-llama", "--out", str(out), "--merge"])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"oneseek verify {out}" in printed and printed.strip().splitlines()[-1] == str(out)
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()

    assert main(["verify", str(out)]) == 0
    assert f"verified: {out}" in capsys.readouterr().out
    data = bytearray((out / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "model.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "mismatch: model.safetensors has changed" in printed and "NOT verified" in printed


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "nope"], "'nope' is not one of"),
        (["--model", "tiny-llama", "--out", "{taken}"], "is not empty"),
    ],
)
def test_export_bad_input_is_one_line_exit_2(
    trained_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: str,
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("")
    args = [a.replace("{taken}", str(taken)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    assert main(["export", str(trained_run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_generate_streams_the_greedy_answer_of_the_merged_model(
    trained_run: Path, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    from services.training.trained import load_trained, locate

    prompt = "The"  # the tiny models answer it at length (most prompts end at once)
    args = ["generate", str(trained_run), "--model", model, "--max-new-tokens", "12", prompt]
    assert main(args) == 0
    streamed = capsys.readouterr()

    trained = load_trained(locate(trained_run, model), merge=True)
    assert trained.merged
    ids = trained.tokenizer(prompt, return_tensors="pt")["input_ids"]
    output = trained.model.generate(
        input_ids=ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=12, do_sample=False
    )
    expected = trained.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    assert expected.strip()  # an answer worth comparing
    assert streamed.out == expected + "\n"
    summary = streamed.err.strip().splitlines()[-1]
    assert summary.startswith("12 tokens in") and "tokens/s" in summary
    assert summary.endswith("finish: length")


def test_generate_options_come_from_the_one_description(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.core.training_config import GENERATE_OPTIONS

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in GENERATE_OPTIONS:
        assert option.cli_flag in text and " ".join(option.help.split()) in text
    assert main(["generate", str(trained_run), "--temperature", "5", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --temperature must be") and "\n" not in err.strip()
    assert main(["generate", str(trained_run), "--model", "nope", "hello"]) == 2
    assert "'nope' is not one of" in capsys.readouterr().err


def test_the_command_line_parses_without_torch() -> None:
    code = (
        "import sys\n"
        "from services.cli import build_parser\n"
        "build_parser().parse_args(['generate', 'run', '--temperature', '0.5', 'hi'])\n"
        "build_parser().parse_args(['export', 'run', '--model', 'm', '--out', 'o'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"
