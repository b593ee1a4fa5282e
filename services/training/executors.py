"""Where a run's members live and how an epoch reaches them: the executor.

`local` (the default) builds the members in the run's own worker process and trains them one
after another, each on its device for its turn. `ray` (services/training/ray_executor.py)
makes each member a Ray actor with the resources its placement asks for, anywhere in the
cluster, and trains them all at once. Either way the Population keeps the epoch barrier, the
rules and the events: an executor only trains, validates and hands back numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.api import training_pb2
from services.api.run_config import RunConfig
from services.core.errors import OneSeekError
from services.training.data import Record
from services.training.member import PopulationMember, StepInfo
from services.training.models import BaseModelInfo

EXECUTORS = ("local", "ray")
DEFAULT_MAX_MEMBER_RESTARTS = 3


OnStep = Callable[[Any, StepInfo], None]
"""Called with the member and its step, in the orchestrating process."""


class MemberLost(OneSeekError):
    """A member's process (or its node) is gone mid-epoch."""


@dataclass(frozen=True)
class ExecutorSettings:
    """How a training service runs its members (its --executor, --ray-address and
    --max-member-restarts): plain values, so a worker process gets them in its spec."""

    kind: str = "local"
    ray_address: str = "auto"
    max_member_restarts: int = DEFAULT_MAX_MEMBER_RESTARTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ray_address": self.ray_address,
            "max_member_restarts": self.max_member_restarts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ExecutorSettings:
        return cls(**data) if data else cls()

    def create(self) -> Executor:
        if self.kind == "ray":
            from services.training.ray_executor import RayExecutor

            return RayExecutor(self.ray_address)
        return LocalExecutor()


class Executor(Protocol):
    kind: str

    def build(
        self,
        config: RunConfig,
        infos: Sequence[BaseModelInfo],
        train: Sequence[Record],
        validation: Sequence[Record],
        placements: Mapping[str, training_pb2.Placement],
    ) -> list[Any]: ...

    def train_epoch(
        self, members: Sequence[Any], epoch: int, stop: Callable[[], bool], on_step: OnStep
    ) -> dict[str, float] | None: ...

    def validate(self, members: Sequence[Any]) -> dict[str, float]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """The members in this process, trained in turn: each on its device for its own turn."""

    kind = "local"

    def build(
        self,
        config: RunConfig,
        infos: Sequence[BaseModelInfo],
        train: Sequence[Record],
        validation: Sequence[Record],
        placements: Mapping[str, training_pb2.Placement],
    ) -> list[Any]:
        return [
            PopulationMember(config, info, train, validation, placements[info.name])
            for info in infos
        ]

    def train_epoch(
        self, members: Sequence[Any], epoch: int, stop: Callable[[], bool], on_step: OnStep
    ) -> dict[str, float] | None:
        losses: dict[str, float] = {}
        for member in members:
            with member.turn():
                loss = member.train_epoch(epoch, stop, lambda step, m=member: on_step(m, step))
            if loss is None:
                return None
            losses[member.name] = loss
        return losses

    def validate(self, members: Sequence[Any]) -> dict[str, float]:
        losses = {}
        for member in members:
            with member.turn():
                losses[member.name] = member.validate()
        return losses

    def close(self) -> None:
        pass
