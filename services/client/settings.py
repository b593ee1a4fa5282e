"""Where a client finds the suite and how it behaves when the suite is away: the two addresses,
the tokens, the CA bundle, the per-call timeout, and the bounded reconnects of a watch.

Every value defaults from the environment the suite's own processes read (services.api.runtime):
ONESEEK_TRAINING_ADDR, ONESEEK_METRICS_ADDR, ONESEEK_ADMIN_TOKEN, ONESEEK_REPORT_TOKEN and
ONESEEK_TLS_CA; the admin token, when the variable is unset, is the one `oneseek up` keeps in
$ONESEEK_STATE_DIR/admin_token. So a script run beside `make run` needs no argument at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.api import runtime
from services.core.checks import finite_number, whole_number
from services.core.layout import state_dir


def stored_admin_token() -> str | None:
    """The admin token `oneseek up` made and keeps in $ONESEEK_STATE_DIR/admin_token (mode
    0600), when this user can read it."""
    try:
        return (state_dir() / "admin_token").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts: `initial`, doubled each time, never above `maximum` seconds."""

    initial: float = 0.2
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        """The wait before retry number `attempt` (1 for the first retry)."""
        return float(min(self.maximum, self.initial * 2 ** max(attempt - 1, 0)))


@dataclass(frozen=True)
class ClientSettings:
    """One client's view of the suite. Build it with `from_env`, which fills what is not given."""

    training_addr: str
    metrics_addr: str
    admin_token: str | None = None
    """Sent with every call: the training service's mutating calls need it when one is set."""
    report_token: str | None = None
    """Sent with ReportMetrics instead of the admin token when set (it may only report)."""
    root_certificates: bytes | None = None
    """The CA bundle to trust (TLS); None: plaintext, safe on loopback only."""
    timeout: float = 30.0
    """Seconds a unary call may take before it fails as Unavailable."""
    retries: int = 8
    """How many times in a row a watch reconnects after its stream broke before it gives up."""
    backoff: Backoff = Backoff()

    def __post_init__(self) -> None:
        finite_number(self.timeout, "timeout", low=0, low_inclusive=False)
        whole_number(self.retries, "retries", 0, 1000)

    @classmethod
    def from_env(
        cls,
        training_addr: str | None = None,
        metrics_addr: str | None = None,
        *,
        admin_token: str | None = None,
        report_token: str | None = None,
        tls_ca: str | None = None,
        timeout: float = 30.0,
        retries: int = 8,
        backoff: Backoff | None = None,
    ) -> ClientSettings:
        """The given values, the environment for the others (None: not given; a token given as
        "" means no token whatever the environment or the state folder says)."""
        return cls(
            training_addr=training_addr or runtime.training_addr(),
            metrics_addr=metrics_addr or runtime.metrics_addr(),
            admin_token=(runtime.admin_token() or stored_admin_token())
            if admin_token is None
            else admin_token or None,
            report_token=runtime.report_token() if report_token is None else report_token or None,
            root_certificates=runtime.client_tls_ca(tls_ca),
            timeout=timeout,
            retries=retries,
            backoff=backoff or Backoff(),
        )

    def training_metadata(self) -> tuple[tuple[str, str], ...]:
        return runtime.bearer(self.admin_token)

    def report_metadata(self) -> tuple[tuple[str, str], ...]:
        return runtime.bearer(self.report_token or self.admin_token)
