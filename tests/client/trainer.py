"""A real `transformers.Trainer` on a demo model, as a user's own script would write one: the
sample dataset's records as text, tokenized, a causal-LM collator, evaluation every epoch."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from tests.processes import REPO


def hide_the_data_folder() -> None:
    """In a test session the repository root is on sys.path, so its `datasets/` folder (sample
    data, no __init__.py) passes for the `datasets` library, which the Trainer then uses
    (`datasets.Dataset`). The library is not installed: say so the documented way, a None in
    sys.modules (find_spec answers None, an import raises ImportError)."""
    present = sys.modules.get("datasets")
    if present is None and "datasets" not in sys.modules:
        spec = importlib.util.find_spec("datasets")
        namespace = spec is not None and spec.origin in (None, "namespace")
    else:
        namespace = present is not None and getattr(present, "__file__", None) is None
    if namespace:
        sys.modules["datasets"] = None  # type: ignore[assignment]
        utils = sys.modules.get("transformers.utils.import_utils")
        if utils is not None:  # transformers asked already: it caches the answer
            utils.is_datasets_available.cache_clear()


hide_the_data_folder()


def records(count: int) -> list[str]:
    lines = (REPO / "datasets" / "sample.jsonl").read_text().splitlines()[:count]
    texts = []
    for line in lines:
        record = json.loads(line)
        texts.append(f"{record['instruction']} {record.get('input', '')}\n{record['output']}")
    return texts


def make_trainer(
    model_dir: Path,
    out: Path,
    *,
    callbacks: list[Any],
    epochs: int = 2,
    examples: int = 40,
    **arguments: Any,
) -> Any:
    """A Trainer of `model_dir` on `examples` sample records (an eighth held out), CPU, batch 4,
    evaluating and logging every epoch, saving nothing."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    encoded = [dict(tokenizer(text, truncation=True, max_length=48)) for text in records(examples)]
    held_out = max(1, examples // 8)
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "num_train_epochs": epochs,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-3,
        "eval_strategy": "epoch",
        "logging_strategy": "epoch",
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        **arguments,
    }
    return Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=encoded[held_out:],
        eval_dataset=encoded[:held_out],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=callbacks,
    )
