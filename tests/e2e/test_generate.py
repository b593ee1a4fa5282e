"""Trying a finished run's models through the real processes: the training service streams each
model's answer over gRPC as it is generated, the gateway relays it as Server-Sent Events, and a
client built from protos/ alone can ask for it. Runs are trained for real (`oneseek train`)
before the service starts, which finds them on disk."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from services.api import training_pb2, training_pb2_grpc
from services.core.verify import verify_export_folder
from services.training.trained import load_trained, locate
from tests.processes import ONESEEK, REPO, GatewayProcess, ServiceProcess, workspace_env

pytestmark = pytest.mark.slow
TOKEN = "generate-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MODELS = ["tiny-llama", "tiny-gpt2"]
PROMPT = "What is the capital of"


def _train(env: dict[str, str], cwd: Path) -> Path:
    done = subprocess.run(
        [
            ONESEEK,
            "train",
            "--models",
            ",".join(MODELS),
            "--dataset",
            "small",
            "--epochs",
            "1",
            "--max-seq-length",
            "48",
        ],
        env={**env, "PATH": str(Path(ONESEEK).parent)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    run_dir = Path(done.stdout.strip().splitlines()[-1].split()[-1])
    assert (run_dir / "oneseek_dna.json").is_file(), done.stdout + done.stderr
    return run_dir


@pytest.fixture(scope="module")
def suite(
    tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("generate")
    env = {**os.environ, **workspace_env(root, demo_models_dir, ONESEEK_ADMIN_TOKEN=TOKEN)}
    runs = [_train(env, root), _train(env, root)]  # the second is tampered with by one test
    logs = tmp_path_factory.mktemp("logs")
    service = ServiceProcess("training-service", env=env, log=logs / "training.log").start()
    gateway = GatewayProcess(
        {**env, "ONESEEK_TRAINING_ADDR": service.addr, "ONESEEK_METRICS_ADDR": "127.0.0.1:9"},
        logs / "gateway.log",
        token=TOKEN,
    ).start(ready="/api/config")
    channel = grpc.insecure_channel(service.addr)
    try:
        yield {
            "env": env,
            "runs": runs,
            "service": service,
            "gateway": gateway,
            "stub": training_pb2_grpc.TrainingServiceStub(channel),
        }
    finally:
        channel.close()
        assert gateway.stop() == 0, gateway.output()
        assert service.stop() == 0, service.output()


def _request(run_dir: Path, **fields: Any) -> training_pb2.GenerateRequest:
    fields.setdefault("prompt", PROMPT)
    fields.setdefault("max_new_tokens", 24)
    return training_pb2.GenerateRequest(run_id=run_dir.name, **fields)


def _collect(stream: Any) -> list[tuple[float, training_pb2.GenerateEvent]]:
    return [(time.perf_counter(), event) for event in stream]


def _texts(events: list[tuple[float, training_pb2.GenerateEvent]]) -> dict[str, str]:
    texts: dict[str, str] = {}
    for _, event in events:
        if event.WhichOneof("payload") == "token":
            texts[event.model] = texts.get(event.model, "") + event.token.text
    return texts


def _greedy(run_dir: Path, model: str, prompt: str, tokens: int) -> str:
    """model.generate, in this process, on the run's adapter merged into its base."""
    trained = load_trained(locate(run_dir, model))
    ids = trained.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = trained.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            do_sample=False,
        )
    return str(trained.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_tokens_stream_before_the_answer_ends_and_greedy_equals_generate(
    suite: dict[str, Any],
) -> None:
    run_dir = suite["runs"][0]
    events = _collect(
        suite["stub"].Generate(
            _request(run_dir, models=MODELS, max_new_tokens=120), metadata=AUTH, timeout=120
        )
    )
    kinds = {m: [e.WhichOneof("payload") for _, e in events if e.model == m] for m in MODELS}
    for model in MODELS:
        assert kinds[model][0] == "started" and kinds[model][-1] == "done", kinds[model]
        assert kinds[model].count("token") >= 2
    done = {e.model: e.done for _, e in events if e.WhichOneof("payload") == "done"}
    texts = _texts(events)
    for model in MODELS:
        first = next(
            e for _, e in events if e.model == model and e.WhichOneof("payload") == "token"
        )
        # sent while the model was still generating: it held fewer tokens than the answer
        assert first.token.completion_tokens < done[model].completion_tokens
        assert done[model].text == texts[model]
        assert done[model].text == _greedy(run_dir, model, PROMPT, 120)
        assert done[model].finish_reason in ("length", "eos")
        assert done[model].tokens_per_second > 0
        assert done[model].time_to_first_token_seconds > 0
    started = next(e.started for _, e in events if e.WhichOneof("payload") == "started")
    assert started.device == "cpu" and started.prompt_tokens > 0


def test_the_best_model_by_default_and_the_cache(suite: dict[str, Any]) -> None:
    run_dir = suite["runs"][0]
    results = json.loads((run_dir / "training_results.json").read_text())
    events = [e for _, e in _collect(suite["stub"].Generate(_request(run_dir), metadata=AUTH))]
    assert {e.model for e in events} == {results["best_model"]}
    again = [e for e in suite["stub"].Generate(_request(run_dir), metadata=AUTH)]
    assert again[0].started.cached and again[0].started.load_seconds == 0
    assert again[-1].done.text == events[-1].done.text  # greedy: the same answer every time


def test_a_seed_gives_one_sampled_answer(suite: dict[str, Any]) -> None:
    run_dir = suite["runs"][0]
    sampled = dict(temperature=1.0, top_p=0.9, max_new_tokens=32)
    answers = [
        list(suite["stub"].Generate(_request(run_dir, seed=seed, **sampled), metadata=AUTH))[-1]
        for seed in (7, 7, 8)
    ]
    assert answers[0].done.text == answers[1].done.text
    assert answers[0].done.text != answers[2].done.text


def test_a_stop_text_ends_the_answer_before_it(suite: dict[str, Any]) -> None:
    run_dir = suite["runs"][0]
    full = _greedy(run_dir, "tiny-llama", PROMPT, 40)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    events = list(
        suite["stub"].Generate(
            _request(run_dir, models=["tiny-llama"], max_new_tokens=40, stop=[stop]),
            metadata=AUTH,
        )
    )
    done = events[-1].done
    assert done.finish_reason == "stop"
    assert done.text == full[: full.index(stop)]


def test_a_client_that_goes_away_ends_its_generation(suite: dict[str, Any]) -> None:
    run_dir = suite["runs"][0]
    stub = suite["stub"]
    for _ in range(6):  # more than the service's concurrent generations: every slot came back
        call = stub.Generate(_request(run_dir, max_new_tokens=400), metadata=AUTH)
        for event in call:
            if event.WhichOneof("payload") == "token":
                break
        call.cancel()
    last = list(stub.Generate(_request(run_dir, max_new_tokens=4), metadata=AUTH))
    assert last[-1].WhichOneof("payload") == "done"


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"prompt": ""}, "INVALID_ARGUMENT", "prompt"),
        ({"max_new_tokens": 5000}, "INVALID_ARGUMENT", "maxNewTokens"),
        # tiny-llama attends to 512 tokens: past it with the answer, then with the prompt alone
        ({"max_new_tokens": 510, "models": ["tiny-llama"]}, "INVALID_ARGUMENT", "maxNewTokens"),
        ({"prompt": "word " * 600, "models": ["tiny-llama"]}, "INVALID_ARGUMENT", "prompt"),
        ({"temperature": -1.0}, "INVALID_ARGUMENT", "temperature"),
        ({"top_p": 0.0}, "INVALID_ARGUMENT", "topP"),
        ({"models": ["tiny-mistral"]}, "NOT_FOUND", "models"),
        ({"models": ["../etc"]}, "INVALID_ARGUMENT", "models"),
        (
            {"messages": [training_pb2.ChatMessage(role="user", content="hi")]},
            "INVALID_ARGUMENT",
            "messages",
        ),  # both prompt and messages
        (
            {
                "prompt": "",
                "messages": [training_pb2.ChatMessage(role="user", content="hi")],
                "models": ["tiny-gpt2"],
            },
            "INVALID_ARGUMENT",
            "messages",
        ),  # no chat template
    ],
)
def test_bad_requests_are_refused_naming_the_field(
    suite: dict[str, Any], fields: dict[str, Any], code: str, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(suite["stub"].Generate(_request(suite["runs"][0], **fields), metadata=AUTH))
    error = caught.value
    assert error.code() == getattr(grpc.StatusCode, code), error.details()
    assert dict(error.trailing_metadata() or ()).get("oneseek-field") == field, error.details()


def test_unknown_runs_and_missing_tokens_are_refused(suite: dict[str, Any]) -> None:
    stub = suite["stub"]
    with pytest.raises(grpc.RpcError) as caught:
        list(
            stub.Generate(
                training_pb2.GenerateRequest(run_id="run-20200101-000000", prompt="x"),
                metadata=AUTH,
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(_request(suite["runs"][0])))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_run_still_training_is_refused(suite: dict[str, Any]) -> None:
    stub = suite["stub"]
    start = training_pb2.StartRunRequest(
        dataset_id="small", base_models=["tiny-llama"], epochs=50, refresh_interval=0.05
    )
    run_id = stub.StartRun(start, metadata=AUTH, timeout=60).run_id
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(training_pb2.GenerateRequest(run_id=run_id, prompt="x"),
                               metadata=AUTH))  # fmt: skip
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "still training" in caught.value.details()
    finally:
        stub.StopRun(training_pb2.StopRunRequest(run_id=run_id), metadata=AUTH, timeout=60)
        deadline = time.monotonic() + 120
        running = training_pb2.RUN_STATUS_RUNNING
        while stub.GetRun(training_pb2.GetRunRequest(run_id=run_id)).status == running:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_chat_messages_go_through_the_tokenizer_s_template(suite: dict[str, Any]) -> None:
    """The demo tokenizers have no chat template (the service refuses messages for them, see
    above); with one, the turns are rendered by it and the answer continues the rendering."""
    from services.api.generate_request import check_generate
    from services.training.generation import answer, prompt_ids

    trained = load_trained(locate(suite["runs"][0], "tiny-llama"))
    trained.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    spec = check_generate(
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Add two and two."}], "max_new_tokens": 12}
    )  # fmt: skip
    ids = prompt_ids(trained, spec)
    rendered = "<system>Be brief.\n<user>Add two and two.\n<assistant>"
    expected = trained.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == expected
    result = answer(trained, ids, spec, lambda *_: None)
    assert result.completion_tokens > 0


def test_a_tampered_run_folder_is_refused(suite: dict[str, Any]) -> None:
    run_dir = suite["runs"][1]
    adapter = run_dir / "adapters" / "tiny-llama" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    with pytest.raises(grpc.RpcError) as caught:
        list(suite["stub"].Generate(_request(run_dir, models=["tiny-llama"]), metadata=AUTH))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not verify" in caught.value.details()
    assert "adapter_model.safetensors" in caught.value.details()


# ---- through the gateway: Server-Sent Events -------------------------------------------------


def _post(gateway: GatewayProcess, run_id: str, body: Any, token: str | None = TOKEN) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{gateway.url}/api/training/{run_id}/generate",
        data=json.dumps(body).encode(),
        headers=headers,
        method="POST",
    )
    return urllib.request.urlopen(request, timeout=120)


def _sse(reply: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = ""
    for raw in reply:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            yield kind, json.loads(line[len("data: ") :])


def test_server_sent_events_through_the_gateway(suite: dict[str, Any]) -> None:
    run_dir, gateway = suite["runs"][0], suite["gateway"]
    body = {"models": MODELS, "prompt": PROMPT, "maxNewTokens": 48, "temperature": 0}
    with _post(gateway, run_dir.name, body) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        events = list(_sse(reply))
    assert events[-1] == ("end", {})
    texts: dict[str, str] = {}
    for kind, data in events:
        if kind == "token":
            texts[data["model"]] = texts.get(data["model"], "") + data["text"]
    done = {data["model"]: data for kind, data in events if kind == "done"}
    for model in MODELS:
        assert done[model]["text"] == texts[model] == _greedy(run_dir, model, PROMPT, 48)
        assert set(done[model]) >= {"time_to_first_token_seconds", "tokens_per_second"}
    started = [data for kind, data in events if kind == "started"]
    assert {s["precision"] for s in started} == {"fp32"}


@pytest.mark.parametrize(
    ("body", "token", "status", "field"),
    [
        ({"prompt": "x", "temperature": 5}, TOKEN, 400, "temperature"),
        ({"prompt": "x", "unknown": 1}, TOKEN, 400, "unknown"),
        ({"maxNewTokens": 3}, TOKEN, 400, "prompt"),
        ({"prompt": "x", "models": ["nope"]}, TOKEN, 404, "models"),
        ({"prompt": "x"}, None, 401, None),
    ],
)
def test_gateway_refusals_come_before_the_stream(
    suite: dict[str, Any], body: Any, token: str | None, status: int, field: str | None
) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(suite["gateway"], suite["runs"][0].name, body, token)
    with caught.value as error:
        assert error.code == status
        envelope = json.loads(error.read())
    assert envelope["field"] == field, envelope


def test_each_client_has_a_bound_on_open_generations(suite: dict[str, Any]) -> None:
    run_dir, gateway = suite["runs"][0], suite["gateway"]
    body = {"prompt": PROMPT, "maxNewTokens": 400}
    open_replies = [_post(gateway, run_dir.name, body) for _ in range(2)]
    try:
        for reply in open_replies:  # both are streaming
            assert next(_sse(reply))[0] == "started"
        with pytest.raises(urllib.error.HTTPError) as caught:
            _post(gateway, run_dir.name, body)
        with caught.value as refused:
            assert refused.code == 429
    finally:
        for reply in open_replies:
            reply.close()
    deadline = time.monotonic() + 30
    while True:  # the gateway notices the closed streams at their next piece
        try:
            with _post(gateway, run_dir.name, {"prompt": PROMPT, "maxNewTokens": 2}) as reply:
                assert list(_sse(reply))[-1][0] == "end"
            break
        except urllib.error.HTTPError as error:
            error.close()
            assert error.code == 429 and time.monotonic() < deadline
            time.sleep(0.2)


# ---- a client that has only protos/ ----------------------------------------------------------

OUTSIDE_CLIENT = """
import sys
import grpc
from oneseek.training.v1 import training_pb2, training_pb2_grpc

addr, token, run_id = sys.argv[1:4]
with grpc.insecure_channel(addr) as channel:
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    request = training_pb2.GenerateRequest(run_id=run_id, prompt="What is the capital of",
                                           max_new_tokens=16)
    for event in stub.Generate(request, metadata=[("authorization", "Bearer " + token)]):
        if event.WhichOneof("payload") == "token":
            sys.stdout.write(event.token.text)
        elif event.WhichOneof("payload") == "done":
            sys.stdout.write("\\n" + event.done.finish_reason + "\\n")
"""


def test_an_outside_client_streams_with_only_the_protos(
    suite: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "client"
    out.mkdir()
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path / 'protos'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "oneseek/training/v1/training.proto",
        ],
        check=True,
    )
    (out / "client.py").write_text(OUTSIDE_CLIENT)
    run_dir = suite["runs"][0]
    done = subprocess.run(
        [sys.executable, "-E", "-s", "client.py", suite["service"].addr, TOKEN, run_dir.name],
        cwd=out,  # -E -s and this cwd: only the generated code and installed packages
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text, reason = done.stdout.rsplit("\n", 2)[:2]
    best = json.loads((run_dir / "training_results.json").read_text())["best_model"]
    assert text == _greedy(run_dir, best, PROMPT, 16)
    assert reason in ("length", "eos")


# ---- exports: over gRPC and as the page's download ---------------------------------------------


def _untar(data: bytes, where: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = archive.getnames()
        archive.extractall(where, filter="data")
    return where / names[0].split("/")[0]


def test_an_export_streams_as_a_tar_that_loads_and_verifies(
    suite: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, stub = suite["runs"][0], suite["stub"]
    request = training_pb2.ExportModelRequest(run_id=run_dir.name, model="tiny-llama", merge=True)
    chunks = list(stub.ExportModel(request, metadata=AUTH))
    assert chunks[0].filename == f"{run_dir.name}-tiny-llama-merged.tar"
    folder = _untar(b"".join(chunk.data for chunk in chunks), tmp_path / "grpc")
    assert verify_export_folder(folder).ok
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert text == _greedy(run_dir, "tiny-llama", PROMPT, 24)
    staging = Path(suite["env"]["ONESEEK_STATE_DIR"]) / "exports"
    assert not staging.exists() or not any(staging.iterdir())  # removed once streamed

    gateway = suite["gateway"]
    url = f"{gateway.url}/api/admin/training/{run_dir.name}/export?model=tiny-gpt2"
    download = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(download, timeout=120) as reply:
        assert reply.headers["Content-Type"] == "application/x-tar"
        name = f"{run_dir.name}-tiny-gpt2-adapter.tar"
        assert reply.headers["Content-Disposition"] == f'attachment; filename="{name}"'
        adapter = _untar(reply.read(), tmp_path / "http")
    assert (adapter / "adapter_config.json").is_file()
    assert verify_export_folder(adapter).ok


@pytest.mark.parametrize(
    ("query", "token", "status", "field"),
    [
        ("model=tiny-mistral", TOKEN, 404, "model"),
        ("model=../x", TOKEN, 400, "model"),
        ("", TOKEN, 400, "model"),
        ("model=tiny-llama&merge=yes", TOKEN, 400, "merge"),
        ("model=tiny-llama", None, 401, None),
        ("model=tiny-llama&token=wrong", None, 401, None),  # the page's link carries it so
    ],
)
def test_export_refusals(
    suite: dict[str, Any], query: str, token: str | None, status: int, field: str | None
) -> None:
    gateway, run_id = suite["gateway"], suite["runs"][0].name
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{gateway.url}/api/admin/training/{run_id}/export?{query}"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    with caught.value as error:
        assert error.code == status
        assert json.loads(error.read())["field"] == field
