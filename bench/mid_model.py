"""The mid demo model (`mid-llama`, ~29M parameters): our trainer vs a bare PyTorch loop, bf16 vs
fp32, and the memory plan's estimate vs the memory training really takes.

1. Throughput. One process, the same `PopulationMember` for both contenders: ours is its
   `train_epoch`, the bare loop is forward, backward, step, zero_grad on the same model object
   (its own AdamW over the same parameters), the same epochs' batches, the same seeds. The
   trainable weights are put back to one snapshot before every timed epoch (off the clock). An
   epoch is STEPS optimizer steps (the member holds STEPS x batch records). One warm-up epoch
   each, then interleaved rounds in rotating order; the median tokens/s of each. Full fine-tune
   in fp32; LoRA in fp32 and bf16 (the bare loop under the same autocast).
2. Memory. Each configuration (fp32/bf16 x LoRA/full x gradient checkpointing off/on) in a
   fresh Python process: torch, transformers, peft and the trainer imported, RSS read, the
   high-water mark reset (`5` into /proc/self/clear_refs), the member built and trained for a
   few steps, the high-water mark read. Measured peak = VmHWM - RSS after the imports. Next to
   it the memory plan's estimate (`memory_plan.dataset_estimator` over the same records: batch
   x the longest tokenized example) and the error (estimate - measured) / measured.

    .venv/bin/python bench/mid_model.py [--rounds 5] [--quick] [--memory-steps 6]
    .venv/bin/python bench/mid_model.py --sweep [--quick]    # memory diagnosis, no figures

bench/run.py runs it with the other benches; alone, it merges its figures into results.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The repo root is deliberately not put on sys.path: its datasets/ folder would shadow the
# `datasets` library that transformers probes for. `services` comes from the editable install.
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402 - after the environment above

from services.api.run_config import RunConfig, build_config  # noqa: E402
from services.training.data import Record, load_dataset, split_dataset  # noqa: E402
from services.training.demo_assets import create_demo_assets  # noqa: E402
from services.training.member import PopulationMember, cpu_placement  # noqa: E402
from services.training.models import BaseModelInfo, resolve_models  # noqa: E402

RESULTS = REPO / "bench" / "results.json"
MODEL = "mid-llama"
BATCH, MAX_SEQ = 8, 64
STEPS = 8
"""Optimizer steps per timed epoch (a mid-model step takes ~0.2-0.4 s on 2 cores)."""
MEMORY_STEPS = 6
"""Steps each memory process trains: the optimizer state exists from the first step on, and
the epoch's longest batch is among them."""
MIB = 1024**2
CASES = [
    (precision, method, checkpointing)
    for precision in ("fp32", "bf16")
    for method in ("lora", "full")
    for checkpointing in (False, True)
]


def run_config(
    method: str, precision: str, checkpointing: bool = False, batch: int = BATCH
) -> RunConfig:
    return build_config(
        {
            "dataset_id": "sample",
            "base_models": [MODEL],
            "method": method,
            "precision": precision,
            "gradient_checkpointing": checkpointing,
            "batch_size": batch,
            "max_seq_length": MAX_SEQ,
        }
    )


def records(steps: int, batch: int = BATCH) -> tuple[list[Record], list[Record]]:
    """(train, validation) of the sample dataset, train cut to `steps` full batches: one epoch
    of the member is then exactly `steps` optimizer steps."""
    dataset = load_dataset("sample", REPO / "datasets")
    train, validation = split_dataset(dataset.records, 0.1, 42)
    return train[: steps * batch], validation


def model_info(models: Path) -> BaseModelInfo:
    return resolve_models([MODEL], models)[0]


def case_name(precision: str, method: str, checkpointing: bool) -> str:
    return f"{precision}_{method}" + ("_ckpt" if checkpointing else "")


# ---- 1. throughput ----------------------------------------------------------------------------

Epoch = Callable[[], int]
"""Trains one epoch; returns the tokens it processed (counted after the clock stopped)."""


def restorer(member: PopulationMember) -> Callable[[], None]:
    """Puts the member's trainable weights back to what they are now."""
    params = [p for p in member.model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for param, value in zip(params, saved, strict=True):
                param.copy_(value)

    return restore


def ours(member: PopulationMember) -> tuple[Callable[[], None], Callable[[], Callable[[], int]]]:
    state = {"epoch": 0}

    def epoch() -> Callable[[], int]:
        state["epoch"] += 1
        done = state["epoch"]
        member.train_epoch(done, stop=lambda: False, on_step=lambda _: None)
        return lambda: sum(b.tokens for b in member.batches(done))

    return restorer(member), epoch


def bare(
    member: PopulationMember, precision: str
) -> tuple[Callable[[], None], Callable[[], Callable[[], int]]]:
    """The loop every PyTorch tutorial writes, on the member's own model object; bf16 under
    the autocast every tutorial uses. The epoch's batches and dropout seed are the trainer's."""
    from services.training.member import derive_seed

    model = member.model
    params = [p for p in model.parameters() if p.requires_grad]
    group = member.optimizer.param_groups[0]  # the run's rate and decay (1e-4, 0.0)
    optimizer = torch.optim.AdamW(params, lr=group["lr"], weight_decay=group["weight_decay"])
    state = {"epoch": 0}
    mixed = precision == "bf16"

    def epoch() -> Callable[[], int]:
        state["epoch"] += 1
        done = state["epoch"]
        batches = member.batches(done)
        torch.manual_seed(derive_seed(member.seed, member.name, "epoch", done))
        model.train()
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
                loss = model(
                    input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels
                ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return lambda: sum(b.tokens for b in batches)

    return restorer(member), epoch


Contender = tuple[Callable[[], None], Callable[[], Callable[[], int]]]


def measure(contenders: dict[str, Contender], rounds: int) -> dict[str, list[float]]:
    """Tokens/s of every timed epoch of each contender: one warm-up epoch each, then `rounds`
    interleaved rounds in rotating order; weights restored before each epoch, off the clock."""
    for restore, run in contenders.values():
        restore()
        run()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            restore, run = contenders[name]
            restore()
            started = time.perf_counter()
            count = run()
            elapsed = time.perf_counter() - started
            samples[name].append(count() / elapsed)
    return samples


def show(title: str, samples: dict[str, list[float]], base: str) -> dict[str, float]:
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"\n{title}")
    print(f"  {'contender':<14} {'median tok/s':>12} {'best':>8} {'vs ' + base:>14}  epochs")
    for name, values in samples.items():
        each = " ".join(f"{v:,.0f}" for v in values)
        ratio = medians[name] / medians[base]
        print(f"  {name:<14} {medians[name]:>12,.0f} {max(values):>8,.0f} {ratio:>14.3f}  {each}")
    return medians


def throughput(models: Path, rounds: int, steps: int) -> dict[str, float]:
    info = model_info(models)
    train, validation = records(steps)
    results: dict[str, float] = {}

    member = PopulationMember(run_config("full", "fp32"), info, train, validation)
    samples = measure({"oneseek": ours(member), "bare loop": bare(member, "fp32")}, rounds)
    full = show(
        f"full fine-tune of {MODEL}, fp32, {steps} steps of {BATCH} per epoch, {rounds} rounds",
        samples,
        "bare loop",
    )
    results["mid_train_ratio_vs_bare"] = full["oneseek"] / full["bare loop"]
    results["mid_train_tokens_per_second"] = full["oneseek"]
    results["mid_bare_tokens_per_second"] = full["bare loop"]
    del member, samples
    gc.collect()

    lora = {
        precision: PopulationMember(
            run_config("lora", precision), info, train, validation, cpu_placement(precision)
        )
        for precision in ("fp32", "bf16")
    }
    contenders = {
        f"{who} {precision}": (ours(member) if who == "oneseek" else bare(member, precision))
        for precision, member in lora.items()
        for who in ("oneseek", "bare")
    }
    speeds = show(
        f"LoRA of {MODEL}, fp32 and bf16, {steps} steps of {BATCH} per epoch, {rounds} rounds",
        measure(contenders, rounds),
        "bare fp32",
    )
    results["mid_lora_train_ratio_vs_bare"] = speeds["oneseek fp32"] / speeds["bare fp32"]
    results["mid_lora_bf16_train_ratio_vs_bare"] = speeds["oneseek bf16"] / speeds["bare bf16"]
    results["mid_lora_train_tokens_per_second"] = speeds["oneseek fp32"]
    results["mid_lora_bare_tokens_per_second"] = speeds["bare fp32"]
    results["mid_lora_bf16_train_tokens_per_second"] = speeds["oneseek bf16"]
    results["bf16_tokens_per_second_ratio_vs_fp32"] = (
        speeds["oneseek bf16"] / speeds["oneseek fp32"]
    )
    print(
        f"  trainer / bare: full fp32 {results['mid_train_ratio_vs_bare']:.3f}, LoRA fp32 "
        f"{results['mid_lora_train_ratio_vs_bare']:.3f}, LoRA bf16 "
        f"{results['mid_lora_bf16_train_ratio_vs_bare']:.3f}; trainer LoRA bf16 / fp32 "
        f"{results['bf16_tokens_per_second_ratio_vs_fp32']:.3f}"
    )
    return results


# ---- 2. memory --------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """This process's memory figures in bytes (VmRSS, VmHWM, RssAnon, RssFile)."""
    text = Path("/proc/self/status").read_text()
    found = re.findall(r"^(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB", text, re.MULTILINE)
    return {name: int(kb) * 1024 for name, kb in found}


def reset_high_water_mark() -> bool:
    """VmHWM back to the current RSS (Linux: `5` into clear_refs); whether it worked."""
    before = proc_status()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status()["VmHWM"] <= max(before["VmRSS"], proc_status()["VmRSS"])


def memory_child(args: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the RSS growth of building the member and training it `steps`
    steps. `built`: RSS after building; `build_peak`/`train_peak`: the high-water mark while
    building / while training (reset in between); all relative to the RSS after the imports."""
    # everything building and training imports, so their code is in the baseline
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    from peft import LoraConfig, get_peft_model  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    info = model_info(Path(args["models"]))
    batch = args.get("batch", BATCH)
    train, validation = records(args["steps"], batch)
    config = run_config(args["method"], args["precision"], args["checkpointing"], batch)
    gc.collect()
    start = proc_status()
    baseline = start["VmRSS"]
    reset = reset_high_water_mark()
    member = PopulationMember(config, info, train, validation, cpu_placement(args["precision"]))
    gc.collect()
    after_build = proc_status()
    reset_high_water_mark()
    seconds: list[float] = []
    member.train_epoch(1, stop=lambda: False, on_step=lambda s: seconds.append(s.seconds))
    after_train = proc_status()
    widest = max(b.input_ids.shape[1] for b in member.batches(1))
    return {
        "baseline": baseline,
        "hwm_reset": reset,
        "built": after_build["VmRSS"] - baseline,
        "built_anon": after_build["RssAnon"] - start["RssAnon"],
        "built_file": after_build["RssFile"] - start["RssFile"],
        "trained_anon": after_train["RssAnon"] - start["RssAnon"],
        "trained_file": after_train["RssFile"] - start["RssFile"],
        "build_peak": after_build["VmHWM"] - baseline,
        "train_peak": after_train["VmHWM"] - baseline,
        "steps": len(seconds),
        "step_seconds": statistics.median(seconds),
        "widest": widest,
    }


def measure_in_child(
    models: Path, case: tuple[str, str, bool], steps: int, batch: int = BATCH
) -> dict[str, Any]:
    precision, method, checkpointing = case
    args = {
        "models": str(models),
        "precision": precision,
        "method": method,
        "checkpointing": checkpointing,
        "steps": steps,
        "batch": batch,
    }
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory process {case} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def memory_case(
    models: Path, case: tuple[str, str, bool], steps: int, batch: int = BATCH
) -> dict[str, Any]:
    """One configuration: the plan's estimate for the records it trains on, the measured peak
    (a fresh process), and the error."""
    from services.training.memory_plan import dataset_estimator
    from services.training.precision import Numerics

    precision, method, checkpointing = case
    train, _ = records(steps, batch)
    config = run_config(method, precision, checkpointing, batch)
    numerics = Numerics(precision, "cpu", method == "lora")
    estimate = dataset_estimator(train)(model_info(models), config, numerics)
    measured = measure_in_child(models, case, steps, batch)
    peak = max(measured["build_peak"], measured["train_peak"])
    return {
        "case": case_name(*case),
        "batch": batch,
        "estimate": estimate,
        "peak": peak,
        "error": (estimate.total - peak) / peak,
        **measured,
    }


def print_memory(rows: Sequence[dict[str, Any]]) -> None:
    print(
        f"  {'case':<15} {'batch':>9} {'estimate':>8} {'measured':>8} {'error':>7} |"
        f" {'est w':>6} {'built':>6} | {'est g+o+a':>9} {'trained':>7} |"
        f" {'build pk':>8} {'file':>6} {'s/step':>6}"
    )
    for row in rows:
        e = row["estimate"]
        shape = f"{row['batch']}x{row['widest']}"
        print(
            f"  {row['case']:<15} {shape:>9} {e.total / MIB:>8.1f} {row['peak'] / MIB:>8.1f} "
            f"{row['error']:>+7.3f} | {e.weights / MIB:>6.1f} {row['built'] / MIB:>6.1f} | "
            f"{(e.gradients + e.optimizer + e.activations) / MIB:>9.1f} "
            f"{(row['train_peak'] - row['built']) / MIB:>7.1f} | "
            f"{row['build_peak'] / MIB:>8.1f} {row['trained_file'] / MIB:>6.1f} "
            f"{row['step_seconds']:>6.2f}"
        )


def memory(models: Path, steps: int) -> dict[str, float]:
    rows = [memory_case(models, case, steps) for case in CASES]
    print(
        f"\nmemory of training {MODEL} on the CPU, MiB: the plan's estimate; measured = peak RSS "
        f"growth of a fresh process over its imports while it builds the member and trains "
        f"{steps} steps (batch = examples x widest tokenized example)"
    )
    if not all(row["hwm_reset"] for row in rows):
        print("  (the high-water mark could not be reset: peaks include the imports' own peak)")
    print_memory(rows)
    print(
        "  est w: the estimate's weights; built: RSS growth once the member is built (before "
        "its first step);\n  est g+o+a: gradients + optimizer + activations; trained: peak while"
        " training - built;\n  build pk: peak while building; file: file-backed RSS growth after "
        "training (mmapped weights, library code)"
    )
    print(
        "  estimate parts (MiB), weights / gradients / optimizer / activations:\n"
        + "\n".join(
            f"    {row['case']:<15} "
            + " / ".join(
                f"{getattr(row['estimate'], part) / MIB:.1f}"
                for part in ("weights", "gradients", "optimizer", "activations")
            )
            for row in rows
        )
    )
    by_case = {row["case"]: row for row in rows}
    worst = max(rows, key=lambda row: abs(row["error"]))
    ratio = by_case["bf16_lora"]["peak"] / by_case["fp32_lora"]["peak"]
    print(
        f"  worst error {worst['error']:+.3f} ({worst['case']}); LoRA peak bf16 / fp32 "
        f"{ratio:.3f} ({by_case['bf16_lora']['peak'] / MIB:.1f} / "
        f"{by_case['fp32_lora']['peak'] / MIB:.1f} MiB)"
    )
    results: dict[str, float] = {
        "memory_estimate_error": abs(worst["error"]),
        "bf16_peak_memory_ratio_vs_fp32": ratio,
        "mid_lora_fp32_peak_mb": by_case["fp32_lora"]["peak"] / MIB,
        "mid_lora_bf16_peak_mb": by_case["bf16_lora"]["peak"] / MIB,
    }
    for row in rows:
        results[f"memory_estimate_error_{row['case']}"] = row["error"]
    return results


def fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return slope, my - slope * mx


def sweep(models: Path, steps: int, batches: Sequence[int] = (1, 8, 16)) -> None:
    """Diagnosis (`--sweep`, not part of the bench's figures): each configuration at several
    batch sizes, the peak while training split into what grows with the batch's tokens (per
    1k tokens) and what does not (the fit at 0 tokens), measured vs estimated. The peak while
    building is left out of the fit (it does not depend on the batch)."""
    rows = [memory_case(models, case, steps, batch) for case in CASES for batch in batches]
    print(f"\nmemory sweep of {MODEL}, {steps} steps at batch {', '.join(map(str, batches))}")
    print_memory(rows)
    print("\n  peak while training, linear in the batch's tokens:")
    print(
        f"  {'case':<15} {'MiB per 1k tokens':>18} {'measured/est':>12} | {'MiB at 0 tokens':>16}"
    )
    print(f"  {'':<15} {'measured':>9} {'estimate':>8} {'':>12} | {'measured':>8} {'estimate':>7}")
    for case in CASES:
        mine = [row for row in rows if row["case"] == case_name(*case)]
        tokens = [row["batch"] * row["widest"] / 1000 for row in mine]
        measured = fit(tokens, [row["train_peak"] / MIB for row in mine])
        estimated = fit(tokens, [row["estimate"].total / MIB for row in mine])
        print(
            f"  {case_name(*case):<15} {measured[0]:>9.1f} {estimated[0]:>8.1f} "
            f"{measured[0] / estimated[0]:>12.2f} | {measured[1]:>8.1f} {estimated[1]:>7.1f}"
        )


# ---- both -------------------------------------------------------------------------------------


def run(
    work: Path, rounds: int = 5, quick: bool = False, memory_steps: int = MEMORY_STEPS
) -> dict[str, Any]:
    """Every mid-model bench; the figures for bench/results.json. `work`: a scratch folder."""
    models = work / "models"
    create_demo_assets(models, work / "datasets", size="mid", log=lambda _: None)
    started = time.monotonic()
    results: dict[str, Any] = {}
    results.update(memory(models, 3 if quick else memory_steps))
    results.update(throughput(models, 1 if quick else rounds, 4 if quick else STEPS))
    results["mid_model_seconds"] = round(time.monotonic() - started, 1)
    return results


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        print(json.dumps(memory_child(json.loads(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one round, fewer steps")
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=MEMORY_STEPS,
        help=f"steps each memory process trains (default {MEMORY_STEPS}; 41 = one epoch)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="diagnosis only: the memory cases at batch 1, 8 and 16, split into what grows "
        "with the tokens and what does not (writes no figures)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oneseek-mid-") as tmp:
        if args.sweep:
            models = Path(tmp) / "models"
            create_demo_assets(models, Path(tmp) / "datasets", size="mid", log=lambda _: None)
            sweep(models, 3 if args.quick else args.memory_steps)
            return 0
        results = run(Path(tmp), args.rounds, args.quick, args.memory_steps)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update(results)
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}: {json.dumps(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
