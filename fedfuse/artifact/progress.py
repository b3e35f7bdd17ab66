"""A rich progress display that follows the coordinator's rounds."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fedfuse.coordinator.records import (
    FederationResult,
    Participant,
    RoundListener,
    RoundRecord,
)


class ProgressDisplay:
    """Shows a bar over rounds and one line per round with each cohort's test accuracy."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(TextColumn("[bold]federated rounds"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                                 transient=True)
        self.task: TaskID | None = None

    def on_start(self, participants: list[Participant], rounds: int) -> None:
        by_arch: dict[str, int] = {}
        for m in participants:
            by_arch[m.arch] = by_arch.get(m.arch, 0) + 1
        cohorts = ", ".join(f"{a} x{n}" for a, n in by_arch.items())
        self.console.print(f"[bold]{len(participants)} clients joined[/bold]: {cohorts}")
        self.progress.start()
        self.task = self.progress.add_task("rounds", total=rounds)

    def on_round(self, record: RoundRecord) -> None:
        parts = [f"{arch} test {_num(c.test_accuracy)} val {_num(c.val_accuracy)}"
                 + ("" if c.max_epsilon is None else f" ε {c.max_epsilon:.2f}")
                 for arch, c in record.cohorts.items()]
        self.progress.console.print(f"round {record.round:>3}  " + "  |  ".join(parts)
                                    + f"  ({record.wall_seconds or 0.0:.1f} s)")
        if self.task is not None:
            self.progress.advance(self.task)

    def on_finish(self, result: FederationResult) -> None:
        self.close()

    def close(self) -> None:
        self.progress.stop()


class Fanout:
    """Passes every event on to several listeners, in order."""

    def __init__(self, *listeners: RoundListener) -> None:
        self.listeners = listeners

    def on_start(self, participants: list[Participant], rounds: int) -> None:
        for lst in self.listeners:
            lst.on_start(participants, rounds)

    def on_round(self, record: RoundRecord) -> None:
        for lst in self.listeners:
            lst.on_round(record)

    def on_finish(self, result: FederationResult) -> None:
        for lst in self.listeners:
            lst.on_finish(result)


def _num(value: float | None) -> str:
    return f"{float('nan') if value is None else value:.3f}"
