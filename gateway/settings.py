"""The gateway's settings: where it listens, where the services are, its tokens and its limits.

Read once from the environment (flags override it); everything else receives a
`GatewaySettings`, so tests build one directly and nothing reads the environment later.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from services.api.runtime import admin_token, metrics_addr, report_token, training_addr

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3001
DEFAULT_WS_MAX_PER_IP = 64
"""A person has a few tabs open, an office behind one NAT a few dozen; a script opening
sockets in a loop is stopped here."""
STATIC_DIR = Path(__file__).resolve().parent / "static"


@functools.lru_cache(maxsize=256)  # asked on every request; bounded: Host comes from clients
def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address or a Host header's name) can only be reached locally."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GatewaySettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    training_addr: str = "127.0.0.1:50051"
    metrics_addr: str = "127.0.0.1:50052"
    admin_token: str | None = None
    """Admin routes need it whenever it is set; without it they are open on loopback only."""
    report_token: str | None = None
    """May report metrics (POST /api/training/{runId}/metrics) besides the admin token."""
    max_body_bytes: int = 1024 * 1024
    rpc_timeout: float = 10.0
    """Deadline of every unary call except StartRun."""
    start_timeout: float = 60.0
    """StartRun validates the dataset, plans the run's memory (tokenizing the dataset once per
    model) and spawns a worker: it may take longer."""
    health_timeout: float = 2.0
    heartbeat_interval: float = 30.0
    """Seconds between websocket heartbeats."""
    client_queue_size: int = 1024
    """Frames a websocket client may have waiting before it is closed as too slow (1013)."""
    client_send_buffer: int = 256 * 1024
    """Kernel send buffer of each websocket: bounds what a stalled client can pin in memory
    and lets a slow one be noticed after a few hundred KiB instead of many MiB."""
    close_timeout: float = 10.0
    """How long a closing websocket may wait for its client before the socket is dropped."""
    ready_timeout: float = 15.0
    """How long a new websocket waits for its run's feed to catch up with the metrics service."""
    feed_linger: float = 60.0
    """A run's feed with no client stays subscribed this long, for quick reconnects."""
    resubscribe_initial: float = 0.1
    resubscribe_max: float = 1.0
    ws_max_per_ip: int = DEFAULT_WS_MAX_PER_IP
    """Open websockets one client address may hold at once (0: no limit); one more is refused
    with 429 before the upgrade. Behind a reverse proxy every client has the proxy's address:
    limit there instead and raise or disable this one (ONESEEK_WS_MAX_PER_IP)."""
    static_dir: Path = STATIC_DIR

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def startup_problem(self) -> str | None:
        """Why the gateway must not start with these settings, or None."""
        if not self.loopback and not self.admin_token:
            return (
                f"Refusing to listen on {self.host}, which is reachable from other machines, "
                "without an admin token: set ONESEEK_ADMIN_TOKEN, or listen on 127.0.0.1."
            )
        if not 0 <= self.port <= 65535:
            return f"--port must be from 0 to 65535, got {self.port}."
        return None

    @classmethod
    def from_env(
        cls,
        *,
        host: str | None = None,
        port: int | None = None,
        training: str | None = None,
        metrics: str | None = None,
    ) -> GatewaySettings:
        """Flags first, then ONESEEK_GATEWAY_HOST / _PORT, ONESEEK_TRAINING_ADDR / _METRICS_ADDR,
        ONESEEK_ADMIN_TOKEN, ONESEEK_REPORT_TOKEN and ONESEEK_WS_MAX_PER_IP, then the
        defaults."""
        env_port = os.environ.get("ONESEEK_GATEWAY_PORT")
        if port is None and env_port:
            try:
                port = int(env_port)
            except ValueError:
                raise ValueError(
                    f"ONESEEK_GATEWAY_PORT must be a port number, got {env_port!r}."
                ) from None
        per_ip = os.environ.get("ONESEEK_WS_MAX_PER_IP") or str(DEFAULT_WS_MAX_PER_IP)
        if not per_ip.isascii() or not per_ip.isdigit() or len(per_ip) > 9:
            raise ValueError(
                "ONESEEK_WS_MAX_PER_IP must be the number of websockets one address may hold "
                f"open (0 for no limit), got {per_ip!r}."
            )
        return cls(
            host=host or os.environ.get("ONESEEK_GATEWAY_HOST") or DEFAULT_HOST,
            port=DEFAULT_PORT if port is None else port,
            training_addr=training or training_addr(),
            metrics_addr=metrics or metrics_addr(),
            admin_token=admin_token(),
            report_token=report_token(),
            ws_max_per_ip=int(per_ip),
        )
