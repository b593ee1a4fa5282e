"""Fixtures shared by the whole suite: offline Hugging Face, demo models made once per session."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# before anything imports transformers: the test machines have no network, and must not try
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# before anything imports ray: a Ray cluster a test starts stays on 127.0.0.1
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Service entry points (`run(args)`) configure the root logger with a handler on the
    current stderr, which pytest closes after the test: put the root logger back after each
    test, so a later test never logs into a closed stream."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):  # pytest's own capture handlers come and go by phase
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models, created once per session (treat as read-only: tests share it)."""
    from services.training.demo_assets import create_demo_assets

    root = tmp_path_factory.mktemp("demo-assets")
    models = root / "models"
    create_demo_assets(models_root=models, datasets_root=root / "datasets", log=lambda _: None)
    return models


@pytest.fixture
def sample_dataset_dir() -> Path:
    """The repository's datasets/ folder (holds sample.jsonl)."""
    return REPO / "datasets"


@dataclass(frozen=True)
class IsolatedEnv:
    models_dir: Path
    datasets_dir: Path
    state_dir: Path


@pytest.fixture
def isolated_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, demo_models_dir: Path
) -> Iterator[IsolatedEnv]:
    """MODELS_DIR with links to the demo models (writable: runs land in oneseek-certified/),
    DATASETS_DIR at the repo's datasets, state in tmp, and no ledger settings."""
    models = tmp_path / "models"
    models.mkdir()
    for model in sorted(demo_models_dir.iterdir()):
        if model.is_dir() and not model.name.startswith("."):
            (models / model.name).symlink_to(model, target_is_directory=True)
    env = IsolatedEnv(models_dir=models, datasets_dir=REPO / "datasets", state_dir=tmp_path / "var")
    monkeypatch.setenv("MODELS_DIR", str(env.models_dir))
    monkeypatch.setenv("DATASETS_DIR", str(env.datasets_dir))
    monkeypatch.setenv("ONESEEK_STATE_DIR", str(env.state_dir))
    monkeypatch.delenv("LEDGER_PRIVATE_KEY_PATH", raising=False)
    monkeypatch.delenv("LEDGER_URL", raising=False)
    yield env


@pytest.fixture(scope="session")
def mid_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODELS_DIR with the ~30M-parameter mid demo model, made once per session (read-only)."""
    from services.training.demo_assets import create_demo_assets

    root = tmp_path_factory.mktemp("mid-assets")
    models = root / "models"
    create_demo_assets(
        models_root=models, datasets_root=root / "datasets", size="mid", log=lambda _: None
    )
    return models


def long_records(count: int, tokens: int, seed: int = 0) -> str:
    """JSONL of `count` records whose completions are about `tokens` single-character words
    (each a token or two for every demo tokenizer): a dataset whose batches are truly long."""
    import json
    import random

    rng = random.Random(seed)
    lines = []
    for index in range(count):
        words = " ".join(rng.choice("abcdefghij") for _ in range(tokens))
        lines.append(json.dumps({"prompt": f"Record {index}:", "completion": words}))
    return "\n".join(lines) + "\n"
