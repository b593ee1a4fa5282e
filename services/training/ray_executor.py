"""The `ray` executor: each member of a run is a Ray actor, created with the resources its
placement asks for (a GPU, or a CPU), anywhere in the cluster; an epoch trains on every actor
at once, and the orchestrator (the run's worker process, a Ray driver) gathers their losses.

Ray is imported only here, and only when a training service runs with `--executor ray`. Every
Ray process this starts gets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in its environment, which
keeps a single-machine cluster on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.api import training_pb2
from services.api.run_config import RunConfig
from services.core.errors import InvalidInput, Unavailable
from services.training.checkpoints import MemberState
from services.training.data import Record
from services.training.executors import MemberLost, OnStep
from services.training.member import PopulationMember, StepInfo
from services.training.models import BaseModelInfo

log = logging.getLogger("oneseek.training.ray")

POLL_SECONDS = 0.1
"""How often the orchestrator collects the actors' steps (and passes on a stop)."""
PROBE_SECONDS = 30
"""How long a StartRun waits for the cluster to say what it has (within the gateway's 60 s)."""
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false"}


def connect(address: str) -> Any:
    """This process as a driver of the cluster at `address` ("auto": the one on this machine;
    "local": start one here, as tests and demos do)."""
    for key, value in RAY_ENV.items():  # before Ray is imported: it reads them then
        os.environ.setdefault(key, value)
    import ray

    if not ray.is_initialized():
        # Ray sets its own SIGTERM handler; the worker's (stop after the current step) stays
        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGTERM) if main else None
        ray.init(
            address=None if address == "local" else address,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": dict(RAY_ENV)},
            num_cpus=(os.cpu_count() or 2) if address == "local" else None,
        )
        if main and handler is not None:
            signal.signal(signal.SIGTERM, handler)
    return ray


class MemberActor:
    """A PopulationMember in its own Ray actor process. Threaded (two calls at once), so the
    orchestrator can collect steps and ask for a stop while an epoch trains."""

    def __init__(
        self,
        config: bytes,
        info: BaseModelInfo,
        train: Sequence[Record],
        validation: Sequence[Record],
        placement: bytes,
    ) -> None:
        self.member = PopulationMember(
            RunConfig.FromString(config),
            info,
            train,
            validation,
            training_pb2.Placement.FromString(placement),
        )
        self._stop = threading.Event()
        self._steps: list[StepInfo] = []
        self._lock = threading.Lock()

    def where(self) -> tuple[int, str]:
        """(steps per epoch, this actor's node and pid)."""
        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
        return self.member.steps_per_epoch, f"{node}/{os.getpid()}"

    def pid(self) -> int:
        return os.getpid()

    def train_epoch(self, epoch: int) -> float | None:
        self._stop.clear()
        with self.member.turn():
            return self.member.train_epoch(epoch, self._stop.is_set, self._record)

    def _record(self, step: StepInfo) -> None:
        with self._lock:
            self._steps.append(step)

    def drain(self) -> tuple[list[StepInfo], float]:
        """The steps since the last call, and the running train loss after them."""
        with self._lock:
            steps, self._steps = self._steps, []
        return steps, self.member.running_loss() if steps else math.nan

    def stop(self) -> None:
        self._stop.set()

    def validate(self) -> float:
        with self.member.turn():
            return self.member.validate()

    def set_learning_rate(self, rate: float) -> float:
        return self.member.set_learning_rate(rate)

    def state(self) -> MemberState:
        return self.member.state()

    def load_state(self, state: MemberState, source: str) -> None:
        self.member.load_state(state, source)

    def save(self, folder: str) -> None:
        self.member.save(Path(folder))


class RemoteMember:
    """The orchestrator's handle on a member actor: the population's calls, made remotely."""

    def __init__(self, ray: Any, actor: Any, name: str) -> None:
        self.ray, self.actor, self._name = ray, actor, name
        self._where = actor.where.remote()  # answered once the actor has built its member
        self._steps_per_epoch, self.node = 0, ""
        self.last_loss = math.nan

    def ready(self) -> RemoteMember:
        """Waits until the actor has built its member; MemberLost if building it failed."""
        self._steps_per_epoch, self.node = self._get(self._where)
        return self

    @property
    def name(self) -> str:
        return self._name

    @property
    def steps_per_epoch(self) -> int:
        return int(self._steps_per_epoch)

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as error:
            raise lost(self.name, error) from error

    def running_loss(self) -> float:
        return self.last_loss

    def set_learning_rate(self, rate: float) -> float:
        return float(self._get(self.actor.set_learning_rate.remote(rate)))

    def state(self) -> MemberState:
        state: MemberState = self._get(self.actor.state.remote())
        return state

    def load_state(self, state: MemberState, source: str = "The checkpoint") -> None:
        self._get(self.actor.load_state.remote(state, source))

    def save(self, folder: Path) -> None:
        self._get(self.actor.save.remote(str(folder)))


def lost(name: str, error: BaseException) -> MemberLost:
    """MemberLost saying why, as far as Ray knows (an error its creation raised, say)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    why = f" Ray says: {lines[-1][:300]}" if lines else ""
    return MemberLost(
        f"Model '{name}' lost its Ray actor ({type(error).__name__}): its process or node "
        f"died.{why}"
    )


class RayExecutor:
    kind = "ray"

    def __init__(self, address: str) -> None:
        self.address = address
        self.actors: list[Any] = []
        self.members: list[RemoteMember] = []

    @property
    def ray(self) -> Any:
        """Ray, this process connected to the cluster (on first use, inside the run: a cluster
        out of reach fails the run with its reason)."""
        return connect(self.address)

    def build(
        self,
        config: RunConfig,
        infos: Sequence[BaseModelInfo],
        train: Sequence[Record],
        validation: Sequence[Record],
        placements: Mapping[str, training_pb2.Placement],
    ) -> list[Any]:
        ray = self.ray
        remote = ray.remote(max_concurrency=2)(MemberActor)
        settings = config.SerializeToString()
        # the records once in the object store, shared by every actor
        train_ref, validation_ref = ray.put(list(train)), ray.put(list(validation))
        members: list[RemoteMember] = []
        for info in infos:
            placement = placements[info.name]
            gpus = 1 if placement.device.startswith("cuda") else 0
            actor = remote.options(
                num_cpus=0 if gpus else 1, num_gpus=gpus, name=None, max_restarts=0
            ).remote(settings, info, train_ref, validation_ref, placement.SerializeToString())
            self.actors.append(actor)
            members.append(RemoteMember(ray, actor, info.name))
        # every actor builds its member at once; then each is asked whether it succeeded
        self.members = [member.ready() for member in members]
        return list(self.members)

    def train_epoch(
        self, members: Sequence[Any], epoch: int, stop: Callable[[], bool], on_step: OnStep
    ) -> dict[str, float] | None:
        ray = self.ray
        running = {member.actor.train_epoch.remote(epoch): member for member in members}
        results: dict[str, float | None] = {}
        stopping = False
        pending = list(running)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_SECONDS)
            if stop() and not stopping:
                stopping = True
                for member in members:
                    member.actor.stop.remote()
            self._collect(members, on_step)
            for ref in done:
                member = running[ref]
                results[member.name] = member._get(ref)
        self._collect(members, on_step)
        if stopping or any(loss is None for loss in results.values()):
            return None
        return {member.name: float(results[member.name]) for member in members}  # type: ignore[arg-type]

    def _collect(self, members: Sequence[Any], on_step: OnStep) -> None:
        drained = [(member, member.actor.drain.remote()) for member in members]
        for member, ref in drained:
            steps, loss = member._get(ref)
            if steps:
                member.last_loss = loss
            for step in steps:
                on_step(member, step)

    def validate(self, members: Sequence[Any]) -> dict[str, float]:
        refs = [(member, member.actor.validate.remote()) for member in members]
        return {member.name: float(member._get(ref)) for member, ref in refs}

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self.actors = []


_CLUSTER_PROBE = """
import json, sys
from services.training.ray_executor import connect
print(json.dumps(connect(sys.argv[1]).cluster_resources()))
"""


def cluster_resources(address: str) -> dict[str, float]:
    """The cluster's total resources, asked by a short child process: the training service
    itself never becomes a Ray driver (Ray would take over its signals and threads)."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _CLUSTER_PROBE, address],
            capture_output=True,
            text=True,
            timeout=PROBE_SECONDS,
            env={**os.environ, **RAY_ENV},
        )
    except subprocess.TimeoutExpired:
        probe = subprocess.CompletedProcess([], 1, "", f"no answer within {PROBE_SECONDS} s")
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else "no reason given"
        raise Unavailable(
            f"The Ray cluster at {address} is out of reach ({reason}). "
            "Start it (ray start --head), point --ray-address at its head, and give this "
            "service its auth settings (RAY_AUTH_MODE, the token)."
        )
    resources: dict[str, float] = json.loads(probe.stdout.strip().splitlines()[-1])
    return resources


def cluster_check(total: Mapping[str, float], placements: Sequence[training_pb2.Placement]) -> None:
    """InvalidInput naming the shortfall when a cluster of `total` resources cannot host every
    member at once (Ray would otherwise wait for resources forever)."""
    gpus_needed = sum(1 for p in placements if p.device.startswith("cuda"))
    cpus_needed = len(placements) - gpus_needed
    short = []
    if gpus_needed > total.get("GPU", 0):
        short.append(f"{gpus_needed} GPU(s), and it has {int(total.get('GPU', 0))}")
    if cpus_needed > total.get("CPU", 0):
        short.append(f"{cpus_needed} CPU(s), and it has {int(total.get('CPU', 0))}")
    if short:
        raise InvalidInput(
            f"The Ray cluster cannot host this run's {len(placements)} model(s) at once: they "
            f"need {' and '.join(short)}. Select fewer models or add nodes to the cluster.",
            field="baseModels",
        )
