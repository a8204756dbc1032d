"""A bag of tasks over a few VMs (SPADE-style), as a state machine without I/O.

Each VM asks for its next task when it finished the last one, so faster VMs
run more.  A task that fails (a non-zero exit) is run once more, on whichever
VM asks next; a task whose VM or host was lost is run again elsewhere without
counting as an attempt, and that VM gets no more tasks.  The bag is done when
every task has a final outcome.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskRun:
    """One attempt at task ``index`` (its file ``task``)."""

    index: int
    task: str
    attempt: int


@dataclass(frozen=True)
class Outcome:
    """The final word on one task, for the summary table."""

    index: int
    task: str
    vm: str
    host: str
    seconds: float
    exit_code: int
    attempts: int
    note: str = ""


@dataclass
class Bag:
    tasks: list[str]
    max_attempts: int = 2
    _queue: deque[TaskRun] = field(default_factory=deque, init=False)
    _running: dict[str, TaskRun] = field(default_factory=dict, init=False)  # vm -> run
    _lost_vms: set[str] = field(default_factory=set, init=False)
    _notes: dict[int, list[str]] = field(default_factory=dict, init=False)
    outcomes: dict[int, Outcome] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._queue.extend(TaskRun(i, t, 1) for i, t in enumerate(self.tasks))

    def next(self, vm: str) -> TaskRun | None:
        """The task ``vm`` should run now; None when there is none for it (yet)."""
        if vm in self._lost_vms or vm in self._running or not self._queue:
            return None
        run = self._queue.popleft()
        self._running[vm] = run
        return run

    def finished(self, vm: str, exit_code: int, seconds: float, host: str) -> None:
        """``vm`` ran its task to an exit status."""
        run = self._running.pop(vm)
        if exit_code != 0 and run.attempt < self.max_attempts:
            self._note(run.index, f"exit {exit_code} on {vm}: tried again")
            self._queue.append(TaskRun(run.index, run.task, run.attempt + 1))
            return
        self.outcomes[run.index] = Outcome(
            run.index,
            run.task,
            vm,
            host,
            round(seconds, 2),
            exit_code,
            run.attempt,
            "; ".join(self._notes.get(run.index, [])),
        )

    def lost(self, vm: str, reason: str) -> None:
        """``vm`` (or its host) is gone: its task runs again elsewhere; it gets no more."""
        self._lost_vms.add(vm)
        run = self._running.pop(vm, None)
        if run is not None:
            self._note(run.index, f"{vm} was lost ({reason}): run again elsewhere")
            self._queue.appendleft(run)

    def _note(self, index: int, text: str) -> None:
        self._notes.setdefault(index, []).append(text)

    @property
    def done(self) -> bool:
        return len(self.outcomes) == len(self.tasks)

    def is_lost(self, vm: str) -> bool:
        return vm in self._lost_vms

    def stuck(self, vms: set[str]) -> bool:
        """Tasks are left but no VM of ``vms`` can take them."""
        return not self.done and vms <= self._lost_vms

    @property
    def left(self) -> int:
        return len(self.tasks) - len(self.outcomes)
