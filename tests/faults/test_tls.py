"""Optional TLS on the gRPC services, with a self-signed certificate made here: both services
serve TLS only; a client without the CA (plaintext, the system's roots, another CA) is refused,
one with it is served; the metrics service follows the training service over TLS; the gateway
reaches both with the CA and reports them down without it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from services.cli import main as cli_main
from tests.processes import ONESEEK, ServiceProcess, workspace_env

pytestmark = pytest.mark.slow


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A CA-capable self-signed certificate for localhost and 127.0.0.1, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def tls_channel(addr: str, ca: bytes | None) -> grpc.Channel:
    return grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=ca))


def health(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


def start_tls(service: ServiceProcess, ca: bytes, timeout: float = 60) -> ServiceProcess:
    """ServiceProcess.start, waiting for health over TLS instead of plaintext."""
    handle = open(service.log, "ab")  # noqa: SIM115 - owned by the child for its life
    service.process = subprocess.Popen(
        [ONESEEK, service.command, "--addr", service.addr, *service.args],
        env={**os.environ, **service.env},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    handle.close()
    deadline = time.monotonic() + timeout
    with tls_channel(service.addr, ca) as channel:
        while time.monotonic() < deadline:
            assert service.process.poll() is None, service.output()
            try:
                if health(channel) == health_pb2.HealthCheckResponse.SERVING:
                    return service
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"{service.command} did not serve TLS in time:\n{service.output()}")


@dataclass
class TlsSuite:
    training: ServiceProcess
    metrics: ServiceProcess
    ca: bytes
    other_ca: bytes
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def tls_suite(
    tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path
) -> Iterator[TlsSuite]:
    root = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(root, "oneseek-test")
    other, _ = self_signed(root, "someone-else")
    env = workspace_env(root / "work", demo_models_dir, records=24)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    ca = cert.read_bytes()
    # grace 1 s: the run started below is cut short at the end, no need to wait for it
    training = start_tls(
        ServiceProcess(
            "training-service", *tls, "--shutdown-grace", "1", env=env, log=root / "training.log"
        ),
        ca,
    )
    metrics = ServiceProcess(
        "metrics-service",
        "--training-addr",
        training.addr,
        *tls,
        "--tls-ca",
        str(cert),
        env=env,
        log=root / "metrics.log",
    )
    try:
        start_tls(metrics, ca)
        yield TlsSuite(training, metrics, ca, other.read_bytes(), cert, key)
    finally:
        codes = [part.stop() for part in (metrics, training) if part.process is not None]
        assert codes == [0] * len(codes), (metrics.output(), training.output())


def test_clients_without_the_ca_are_refused(tls_suite: TlsSuite) -> None:
    for addr in (tls_suite.training.addr, tls_suite.metrics.addr):
        with grpc.insecure_channel(addr) as plaintext, pytest.raises(grpc.RpcError) as caught:
            health(plaintext)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        for ca in (None, tls_suite.other_ca):  # the system's roots; a CA that did not sign it
            with tls_channel(addr, ca) as channel, pytest.raises(grpc.RpcError) as caught:
                health(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        with tls_channel(addr, tls_suite.ca) as channel:
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_the_metrics_service_follows_over_tls(tls_suite: TlsSuite) -> None:
    with tls_channel(tls_suite.training.addr, tls_suite.ca) as channel:
        training = training_pb2_grpc.TrainingServiceStub(channel)
        names = [
            model.name for model in training.ListModels(training_pb2.ListModelsRequest()).models
        ]
        assert "tiny-gpt2" in names
        run_id = training.StartRun(
            training_pb2.StartRunRequest(
                dataset_id="small",
                base_models=["tiny-gpt2"],
                epochs=1,
                batch_size=8,
                max_seq_length=32,
                refresh_interval=0.05,
            ),
            timeout=60,
        ).run_id
    deadline = time.monotonic() + 120
    with tls_channel(tls_suite.metrics.addr, tls_suite.ca) as channel:
        metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
        while True:
            try:
                reply = metrics.GetMetrics(metrics_pb2.GetMetricsRequest(run_id=run_id), timeout=5)
                if reply.total_epochs == 1:
                    break  # the run's config and events came through the follower, over TLS
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND, error  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, tls_suite.metrics.output()
            time.sleep(0.1)
    assert "training_tls=True" in tls_suite.metrics.output()
    # and an event of the run arrives through the followed stream, then to a TLS subscriber
    with tls_channel(tls_suite.metrics.addr, tls_suite.ca) as channel:
        stream = metrics_pb2_grpc.MetricsServiceStub(channel).Subscribe(
            metrics_pb2.SubscribeRequest(run_id=run_id), timeout=120
        )
        kinds = []
        for event in stream:
            kinds.append(event.WhichOneof("payload"))
            if event.seq >= 1:
                stream.cancel()  # type: ignore[no-untyped-call]
                break
    assert kinds[0] == "initial_state" and len(kinds) == 2, kinds


async def test_the_gateway_reaches_tls_services_only_with_the_ca(tls_suite: TlsSuite) -> None:
    settings = GatewaySettings(
        port=0,
        training_addr=tls_suite.training.addr,
        metrics_addr=tls_suite.metrics.addr,
        health_timeout=3.0,
    )
    for ca, status in ((tls_suite.ca, 200), (tls_suite.other_ca, 503)):
        client = TestClient(TestServer(create_app(settings, tls_ca=ca), host="127.0.0.1"))
        await client.start_server()
        try:
            reply = await client.get("/healthz")
            assert reply.status == status, await reply.text()
            if status == 200:
                models = await client.get("/api/admin/models")
                assert models.status == 200
        finally:
            await client.close()


def test_half_a_tls_configuration_is_refused(
    tls_suite: TlsSuite, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate without its key, or a path that is not a readable PEM file, stops the
    service at once with exit 2 and says which flag, instead of serving plaintext."""
    cert = str(tls_suite.cert)
    cases = [
        (["--tls-cert", cert], "--tls-key"),
        (["--tls-key", str(tls_suite.key)], "--tls-cert"),
        (["--tls-cert", cert, "--tls-key", str(tmp_path / "nope.key")], "nope.key"),
        (["--tls-cert", cert, "--tls-key", str(tls_suite.cert.parent)], "--tls-key"),
        (["--tls-cert", str(tmp_path), "--tls-key", str(tls_suite.key)], "--tls-cert"),
        (["--tls-ca", str(tls_suite.key.with_suffix(".missing"))], "--tls-ca"),
    ]
    (tmp_path / "plain.txt").write_text("not a certificate")
    cases.append((["--tls-ca", str(tmp_path / "plain.txt")], "not a PEM file"))
    for flags, words in cases:
        code = cli_main(
            [
                "metrics-service",
                "--addr",
                "127.0.0.1:0",
                "--db-url",
                f"sqlite:///{tmp_path / 'm.db'}",
                *flags,
            ]
        )
        err = capsys.readouterr().err
        assert code == 2, (flags, err)
        assert words in err, (flags, err)
    assert not (tmp_path / "m.db").exists()  # refused before anything was opened
