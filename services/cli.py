"""The `oneseek` command: train in a terminal, verify a run folder or an export, export and try
a trained model, make demo assets, run the suite.

Flags override the environment (MODELS_DIR, DATASETS_DIR, ...). Bad input is one line on
stderr naming the problem and exit status 2; a run that fails exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from services.core.errors import OneSeekError
from services.core.layout import datasets_dir, models_dir
from services.core.training_config import GENERATE_OPTIONS, START_OPTIONS, StartOption

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130
"""Ctrl-C ended `generate` early (128 + SIGINT, as shells report it)."""


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


# The start options' own flags (services/core/training_config.py): the CLI and the REST route
# share one set of checks and say the same things about bad values.
_TYPES: dict[str, type] = {"integer": int, "number": float, "enum": str, "string": str}
_FLAGS = {option.camel: option.cli_flag for option in START_OPTIONS}
"""camelCase start field -> its flag."""
_GENERATE_FLAGS = {
    **{option.camel: option.cli_flag for option in GENERATE_OPTIONS},
    "models": "--model",
}
"""camelCase generate field -> its flag."""


def _number_help(option: StartOption) -> str:
    """The option's help, then what it allows and its default."""
    shown = [option.hint] if option.hint else []
    if not option.required:
        shown.append(f"default {option.default_value()}")
    return option.help + (f" ({'; '.join(shown)})" if shown else "")


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    for option in START_OPTIONS:
        flag, help = option.cli_flag, option.help
        # an enum's choices are shown, not enforced here: the option's own check names them
        shown = list(option.choices) if option.kind == "enum" else None
        metavar = "{" + ",".join(shown) + "}" if shown else flag[2:].replace("-", "_").upper()
        if option.kind == "array":  # a comma list; BASE_MODELS serves a worker started by hand
            parser.add_argument(
                flag,
                dest=option.camel,
                metavar=metavar,
                help=f"{help} Comma-separated (default $BASE_MODELS).",
            )
        elif option.kind == "boolean":
            parser.add_argument(
                flag, dest=option.camel, help=help, action=argparse.BooleanOptionalAction
            )
        else:
            parser.add_argument(
                flag,
                dest=option.camel,
                metavar=metavar,
                type=_TYPES[option.kind],
                required=option.required,
                help=_number_help(option),
            )


def _train_request(args: argparse.Namespace) -> dict[str, Any]:
    """The camelCase start body of the flags given (the rest take the options' defaults)."""
    body = {name: getattr(args, name) for name in _FLAGS}
    selection = body["baseModels"]
    if selection is None:  # no default model exists: an empty selection is refused
        selection = os.environ.get("BASE_MODELS", "")
    body["baseModels"] = [m.strip() for m in selection.split(",") if m.strip()]
    return body


def _as_flag(exc: OneSeekError, flags: dict[str, str] = _FLAGS) -> str:
    """The checks speak the request's field names; a terminal user typed flags."""
    flag = flags.get(exc.field or "")
    if flag and exc.message.startswith(exc.field or ""):
        return flag + exc.message[len(exc.field or "") :]
    return exc.message


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from services.api import training_pb2
    from services.api.run_config import config_from_body
    from services.core.training_config import generate_run_id
    from services.training.data import load_dataset
    from services.training.events import EVENTS_FILE, EventLog
    from services.training.memory_plan import placements_of, planned_models
    from services.training.models import resolve_models
    from services.training.population import TrainingRun
    from services.training.run_folder import RunFolder, certified_root
    from services.training.terminal import TerminalDisplay

    models_root, datasets_root = models_dir(args.models_dir), datasets_dir(args.datasets_dir)
    try:
        config = config_from_body(_train_request(args))
        models = resolve_models(list(config.base_models), models_root)
        dataset = load_dataset(config.dataset_id, datasets_root)
        run_id = generate_run_id(exists=lambda rid: (certified_root(models_root) / rid).exists())
        planned = planned_models(config, models, dataset.records)
        folder = RunFolder.create(models_root, run_id)
        folder.write_manifest(config, planned)
    except OneSeekError as exc:
        return _error(_as_flag(exc))

    stop = threading.Event()
    console = Console(stderr=True, quiet=args.quiet)

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        console.print("[yellow]Stopping after the current step (Ctrl-C again to abort)...[/]")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        display = TerminalDisplay(config, run_id, console)
        events = EventLog(run_id, path=folder.path / EVENTS_FILE, sinks=(display.on_event,))
        run = TrainingRun(
            config,
            run_id=run_id,
            models=models,
            dataset=dataset,
            folder=folder,
            events=events,
            stop=stop,
            on_step=display.on_step,
            placements=placements_of(planned),
        )
        with folder.worker_lock():
            try:
                run.prepare()
            except OneSeekError as exc:
                # a model folder that fails to load is bad input too: nothing was trained,
                # so no half-made run folder stays behind
                folder.discard()
                return _error(_as_flag(exc))
            with display:
                outcome = run.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"{outcome.run_id} {outcome.run_dir}")
    return EXIT_FAILED if outcome.status == training_pb2.RUN_STATUS_FAILED else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from services.core.layout import EXPORT_MANIFEST_FILE
    from services.core.verify import verify_export_folder, verify_run_folder

    folder = Path(args.run_folder)
    if not folder.is_dir():
        return _error(
            f"{folder} is not a folder; pass a run folder such as "
            "models/oneseek-certified/run-20260101-120000, or a folder `oneseek export` wrote."
        )
    models_root = Path(args.models_dir) if args.models_dir else None
    if models_root is None and os.environ.get("MODELS_DIR"):
        models_root = Path(os.environ["MODELS_DIR"])
    if (folder / EXPORT_MANIFEST_FILE).exists():
        report = verify_export_folder(
            folder, models_root=models_root, trusted_public_key=args.public_key
        )
    else:
        report = verify_run_folder(
            folder, models_root=models_root, trusted_public_key=args.public_key
        )
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print(f"verified: {folder}")
        return EXIT_OK
    for problem in report.problems:
        print(f"mismatch: {problem}")
    print(f"NOT verified: {folder} ({len(report.problems)} problem(s))")
    return EXIT_FAILED


def _run_folder(given: str) -> Path | None:
    folder = Path(given)
    return folder if folder.is_dir() else None


def _not_a_run_folder(given: str) -> int:
    return _error(
        f"{given} is not a folder; pass a run folder such as "
        "models/oneseek-certified/run-20260101-120000."
    )


def cmd_export(args: argparse.Namespace) -> int:
    from services.training.export import export_model
    from services.training.trained import default_models_root

    run_dir = _run_folder(args.run_folder)
    if run_dir is None:
        return _not_a_run_folder(args.run_folder)
    models_root = Path(args.models_dir) if args.models_dir else default_models_root(run_dir)
    try:
        out = export_model(
            run_dir, args.model, Path(args.out), merge=args.merge, models_root=models_root
        )
    except OneSeekError as exc:
        return _error(_as_flag(exc, {"model": "--model", "out": "--out"}))
    manifest = json.loads((out / "oneseek_export.json").read_text(encoding="utf-8"))
    what = (
        "the full fine-tuned weights"
        if manifest["method"] == "full"
        else "the LoRA adapter merged into its base (float32)"
        if manifest["merged"]
        else "the LoRA adapter alone"
    )
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    count = len(manifest["files"]) + 1
    print(f"exported {args.model} of {run_dir.name}: {what}, {count} files, {size / 1e6:.1f} MB")
    print(f"model card: {out / 'README.md'}")
    proof = json.loads((out / "ledger_proof.json").read_text(encoding="utf-8"))
    if proof.get("signer_public_key") != manifest["signer_public_key"]:
        print(
            f"note: the manifest is signed by this machine's ledger key "
            f"{manifest['signer_public_key']}, not by the key that signed the run "
            f"({proof.get('signer_public_key')}); LEDGER_PRIVATE_KEY_PATH names the key to use."
        )
    print(f"verify it with: oneseek verify {out}")
    print(out)
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from services.api.generate_request import check_generate
    from services.training.generation import answer, prompt_ids
    from services.training.trained import best_model, default_models_root, load_trained, locate

    run_dir = _run_folder(args.run_folder)
    if run_dir is None:
        return _not_a_run_folder(args.run_folder)
    models_root = Path(args.models_dir) if args.models_dir else default_models_root(run_dir)
    values: dict[str, Any] = {
        option.name: getattr(args, option.name) for option in GENERATE_OPTIONS
    }
    values.update(prompt=args.prompt, stop=args.stop or [])
    try:
        spec = check_generate({**values, "models": [args.model] if args.model else []})
        model = args.model or best_model(run_dir)
        if model is None:
            return _error(f"Run {run_dir.name} has no best model; name one with --model.")
        source = locate(run_dir, model, models_root)
        print(f"loading {model} of {source.run_id} ...", file=sys.stderr, flush=True)
        trained = load_trained(source)
        ids = prompt_ids(trained, spec)
    except OneSeekError as exc:
        return _error(_as_flag(exc, _GENERATE_FLAGS))
    print(
        f"{model} on {trained.device} ({trained.precision}), loaded in "
        f"{trained.load_seconds:.1f} s; {ids.shape[1]} prompt tokens",
        file=sys.stderr,
        flush=True,
    )

    cancelled = threading.Event()
    out = sys.stdout

    def on_piece(text: str, tokens: int) -> None:
        if cancelled.is_set():
            return
        try:
            out.write(text)
            out.flush()
        except BrokenPipeError:  # `| head`: nobody reads the rest, so stop generating it
            cancelled.set()

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        if cancelled.is_set():
            raise KeyboardInterrupt
        cancelled.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        result = answer(trained, ids, spec, on_piece, cancelled)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        out.write("\n")
        out.flush()
    except BrokenPipeError:
        # the reader is gone: point stdout at nothing so the interpreter's final flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    rate = result.completion_tokens / max(result.generation_seconds, 1e-9)
    print(
        f"{result.completion_tokens} tokens in {result.generation_seconds:.2f} s "
        f"({rate:.1f} tokens/s), finish: {result.finish_reason}",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED if result.finish_reason == "cancelled" else EXIT_OK


def cmd_demo_assets(args: argparse.Namespace) -> int:
    from services.training.demo_assets import create_demo_assets

    created = create_demo_assets(
        models_dir(args.models_dir),
        datasets_dir(args.datasets_dir),
        force=args.force,
        size=args.size,
    )
    print(f"{len(created)} demo asset(s) created" if created else "demo assets already present")
    return EXIT_OK


def _lazy(module: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).run(args))

    return call


def _tls_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-cert", help="PEM certificate chain: serve gRPC over TLS (default $ONESEEK_TLS_CERT)"
    )
    parser.add_argument(
        "--tls-key", help="PEM private key of --tls-cert (default $ONESEEK_TLS_KEY)"
    )


def _tls_client_flag(parser: argparse.ArgumentParser, whom: str) -> None:
    parser.add_argument(
        "--tls-ca", help=f"PEM CA bundle: reach {whom} over TLS (default $ONESEEK_TLS_CA)"
    )


def _metrics_port_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (default: not served)",
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneseek", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models-dir", help="base models folder (default $MODELS_DIR or models)")
        p.add_argument("--datasets-dir", help="datasets folder (default $DATASETS_DIR or datasets)")

    train = sub.add_parser("train", help="train several base models side by side in this terminal")
    _add_train_flags(train)
    train.add_argument("--quiet", action="store_true", help="print only the last line")
    common(train)
    train.set_defaults(func=cmd_train)

    verify = sub.add_parser(
        "verify", help="check a run folder's or an export's hashes and signatures offline"
    )
    verify.add_argument("run_folder", metavar="FOLDER", help="a run folder or an export folder")
    verify.add_argument(
        "--public-key", help="base64 Ed25519 key the proof (and an export) must be signed with"
    )
    verify.add_argument("--models-dir", help="also check base model hashes found here")
    verify.set_defaults(func=cmd_verify)

    where = "base models folder (default: the folder holding oneseek-certified/ when the run "
    where += "is in it, else $MODELS_DIR or models)"
    export = sub.add_parser(
        "export",
        help="write one model of a run as a folder from_pretrained loads, with a model card",
        description="Write one model of a certified run as a folder that transformers' "
        "from_pretrained loads as it is: the LoRA merged into its base (--merge), or the "
        "adapter alone; a full fine-tune's weights either way. With its tokenizer, a model "
        "card (README.md) and a signed manifest `oneseek verify` checks.",
    )
    export.add_argument("run_folder", metavar="RUN_FOLDER")
    export.add_argument("--model", required=True, help="which of the run's models")
    export.add_argument("--out", required=True, help="the new (or empty) folder to write")
    export.add_argument(
        "--merge",
        action="store_true",
        help="merge the LoRA adapter into the base weights (float32; a 4-bit run needs a CUDA "
        "GPU); without it a LoRA run exports its adapter alone",
    )
    export.add_argument("--models-dir", help=where)
    export.set_defaults(func=cmd_export)

    generate = sub.add_parser(
        "generate",
        help="stream a trained model's answer to a prompt, in this process",
        description="Load one model of a certified run (after verifying the run folder) and "
        "stream its answer to PROMPT on stdout; a summary goes to stderr. Ctrl-C stops it.",
    )
    generate.add_argument("run_folder", metavar="RUN_FOLDER")
    generate.add_argument("prompt", metavar="PROMPT", help="the text the model continues")
    generate.add_argument("--model", help="which of the run's models (default: the run's best)")
    for option in GENERATE_OPTIONS:
        generate.add_argument(
            option.cli_flag,
            dest=option.name,
            metavar=option.cli_flag[2:].replace("-", "_").upper(),
            type=_TYPES[option.kind],
            help=_number_help(option),
        )
    generate.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end the answer before this text (repeat for several)",
    )
    generate.add_argument("--models-dir", help=where)
    generate.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo-assets", help="create tiny seeded demo models and the sample data")
    demo.add_argument("--force", action="store_true", help="recreate existing demo models")
    demo.add_argument(
        "--size",
        choices=("tiny", "mid", "all"),
        default="tiny",
        help="tiny: four 0.1-0.3M-parameter models of different architectures (the default); "
        "mid: a ~30M-parameter Llama for benchmarks; all: both",
    )
    common(demo)
    demo.set_defaults(func=cmd_demo_assets)

    # Service flags are declared here, not in the service modules: building this parser must
    # not import torch or aiohttp (`oneseek verify` and `--help` stay instant).
    training = sub.add_parser("training-service", help="serve TrainingService over gRPC")
    training.add_argument("--addr", help="listen address (default $ONESEEK_TRAINING_ADDR)")
    common(training)
    training.add_argument("--max-active-runs", type=int, help="concurrent runs (default 1)")
    training.add_argument(
        "--executor",
        choices=("local", "ray"),
        default=os.environ.get("ONESEEK_EXECUTOR", "local"),
        help="local: each run's members train in turn in its worker process (default); ray: "
        "each member is a Ray actor and they train at once (default $ONESEEK_EXECUTOR)",
    )
    training.add_argument(
        "--ray-address",
        default=os.environ.get("ONESEEK_RAY_ADDRESS", "auto"),
        help="the Ray cluster: auto (the one on this machine), HOST:PORT of its head, or local "
        "(start one in the worker) (default $ONESEEK_RAY_ADDRESS or auto)",
    )
    training.add_argument(
        "--max-member-restarts",
        type=int,
        default=3,
        help="with ray: how often a run rebuilds its members after one died mid-epoch",
    )
    training.add_argument(
        "--generate-cache-gib",
        type=_positive_float,
        default=os.environ.get("ONESEEK_GENERATE_CACHE_GIB"),
        help="GiB of loaded models kept for Generate, least recently used out (default "
        "$ONESEEK_GENERATE_CACHE_GIB, else half of this machine's memory)",
    )
    _tls_server_flags(training)
    _metrics_port_flag(training)
    training.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds active runs get to stop cleanly on SIGTERM",
    )
    training.set_defaults(func=_lazy("services.training.server"))

    metrics = sub.add_parser("metrics-service", help="serve MetricsService over gRPC")
    metrics.add_argument("--addr", help="listen address (default $ONESEEK_METRICS_ADDR)")
    metrics.add_argument(
        "--training-addr", help="training service to follow (default $ONESEEK_TRAINING_ADDR)"
    )
    metrics.add_argument(
        "--db-url", help="sqlite:///path (default $ONESEEK_DB_URL or sqlite:///var/metrics.db)"
    )
    _tls_server_flags(metrics)
    _tls_client_flag(metrics, "the training service")
    _metrics_port_flag(metrics)
    metrics.add_argument(
        "--mlflow-tracking-uri",
        help="mirror every run into this MLflow server, e.g. http://127.0.0.1:5000 "
        "(default $MLFLOW_TRACKING_URI; unset: no mirror)",
    )
    metrics.add_argument(
        "--mlflow-experiment",
        help="the MLflow experiment runs go to (default $MLFLOW_EXPERIMENT_NAME or oneseek)",
    )
    metrics.set_defaults(func=_lazy("services.metrics.server"))

    gateway = sub.add_parser("gateway", help="serve the REST routes, websocket and admin page")
    gateway.add_argument("--host", help="listen host (default $ONESEEK_GATEWAY_HOST or 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (default $ONESEEK_GATEWAY_PORT or 3001)")
    gateway.add_argument(
        "--training-addr", help="training service (default $ONESEEK_TRAINING_ADDR)"
    )
    gateway.add_argument("--metrics-addr", help="metrics service (default $ONESEEK_METRICS_ADDR)")
    _tls_client_flag(gateway, "the services")
    gateway.set_defaults(func=_lazy("gateway.cli"))

    up = sub.add_parser("up", help="start the whole suite for local use")
    up.add_argument("--host", help="gateway host (default $ONESEEK_GATEWAY_HOST or 127.0.0.1)")
    up.add_argument("--port", type=int, help="gateway port (default $ONESEEK_GATEWAY_PORT or 3001)")
    common(up)
    up.set_defaults(func=_lazy("services.up"))
    return parser


def _quiet_libraries() -> None:
    """The terminal UI is ours: no per-file loading bars or advisory notes from the HF stack."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except OneSeekError as exc:
        return _error(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
