"""What `oneseek train` shows: a live progress bar and a leaderboard table per epoch."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from services.api import training_pb2
from services.api.codec import message_to_dict, run_status_name
from services.api.run_config import RunConfig
from services.training.population import StepInfo


class TerminalDisplay:
    """An EventLog sink and `on_step` hook that renders a run for a person at a terminal."""

    def __init__(self, config: RunConfig, run_id: str, console: Console | None = None) -> None:
        self.config = config
        self.run_id = run_id
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("preparing", total=None, detail="")

    def __enter__(self) -> TerminalDisplay:
        models = ", ".join(self.config.base_models)
        self.console.print(
            f"[bold]{self.run_id}[/]: {models} on '{self.config.dataset_id}', "
            f"{self.config.epochs} epoch(s), method {message_to_dict(self.config)['method']}, "
            f"learning rate {self.config.learning_rate:g}"
        )
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def on_step(self, info: StepInfo) -> None:
        self.progress.update(
            self.task,
            completed=info.steps_done,
            total=info.steps_planned,
            description=f"epoch {info.epoch}/{self.config.epochs} {info.model}",
        )

    def on_event(self, event: training_pb2.TrainingEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "progress":
            p = event.progress
            self.progress.update(
                self.task, detail=f"loss {p.train_loss:.4f} · {p.tokens_per_second:,.0f} tok/s"
            )
        elif kind == "epoch_end":
            self._leaderboard(event.epoch_end)
        elif kind == "auto_stop_triggered":
            window = ", ".join(f"{x:.4f}" for x in event.auto_stop_triggered.window)
            self.console.print(
                f"[yellow]Confidence auto-stop at epoch {event.auto_stop_triggered.epoch}: "
                f"total loss plateaued ({window})[/]"
            )
        elif kind == "training_complete":
            done = event.training_complete
            self.console.print(
                f"[green]{run_status_name(done.status)}[/] after {done.epochs_run} epoch(s) in "
                f"{done.duration_seconds:.1f} s; best model: "
                f"{done.best_model if done.HasField('best_model') else '-'}; DNA {done.dna}"
            )
        elif kind == "training_error":
            self.console.print(f"[red]failed:[/] {event.training_error.message}")

    def _leaderboard(self, end: training_pb2.EpochEnd) -> None:
        info = end.auto_stop_info
        change = f"{info.current_change:.6f}" if info.HasField("current_change") else "-"
        table = Table(
            title=f"Epoch {end.epoch}/{end.total_epochs} · total loss {end.total_loss:.4f} · "
            f"change {change} · auto-stop "
            + ("triggered" if info.triggered else f"{info.remaining} epoch(s) remaining"),
            title_justify="left",
        )
        for column in ("rank", "model", "val loss", "train loss", "weight", "learning rate"):
            table.add_column(column, justify="left" if column == "model" else "right")
        ranked = sorted(end.val_losses.items(), key=lambda item: (item[1], item[0]))
        for rank, (name, loss) in enumerate(ranked, start=1):
            table.add_row(
                str(rank),
                name,
                f"{loss:.4f}",
                f"{end.train_losses[name]:.4f}",
                f"{end.weights[name]:.3f}",
                f"{end.lr_multipliers[name]:.3g}",
            )
        self.console.print(table)
