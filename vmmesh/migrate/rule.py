"""Migrate or restart: the thesis's rule (§5.4), from this mesh's own figures.

Moving a VM keeps the work it has done; starting a fresh one elsewhere loses
it but may be quicker.  Migration pays when the run time already spent is
greater than what migrating costs beyond a fresh start:

    run_seconds > migrate_seconds - start_seconds

The thesis measured a fixed 65 s break-even on its machines.  Here every
term is measured: ``migrate_seconds`` is the bytes that must move (the
overlay's and, offline, the saved state's; live, the RAM that is in use)
over the rate measured to that target (``host.history`` transfers), plus the
target's measured resume time; ``start_seconds`` is the measured time of a
fresh VM of that template on the target (warm or cold).  With no rate
measured yet there is nothing to decide from: migrate (keeping the work is
never wrong, only possibly slower).  Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figures:
    """What the decision reads, all measured."""

    run_seconds: float  # how long the VM has run
    bytes_to_move: int  # overlay (+ state offline, + RAM in use live)
    rate: float | None  # bytes per second measured to the target; None: never measured
    resume_seconds: float  # measured time for the target to resume a moved VM
    start_seconds: float  # measured time of a fresh VM of the template on the target


@dataclass(frozen=True)
class Decision:
    migrate: bool
    migrate_seconds: float | None
    break_even: float | None  # run time after which migrating pays
    why: str


def decide(f: Figures) -> Decision:
    """Migrate when the run time spent exceeds migration time minus a fresh start."""
    if f.rate is None or f.rate <= 0:
        return Decision(True, None, None, "no transfer rate measured to the target: migrate")
    migrate_seconds = f.bytes_to_move / f.rate + f.resume_seconds
    break_even = max(0.0, migrate_seconds - f.start_seconds)
    if f.run_seconds >= break_even:
        why = (
            f"it has run {f.run_seconds:.0f} s, at least the {break_even:.1f} s a move "
            f"costs beyond a fresh start ({migrate_seconds:.1f} s - {f.start_seconds:.1f} s)"
        )
        return Decision(True, migrate_seconds, break_even, why)
    why = (
        f"it has run {f.run_seconds:.0f} s, less than the {break_even:.1f} s a move costs "
        f"beyond a fresh start ({migrate_seconds:.1f} s - {f.start_seconds:.1f} s): restart"
    )
    return Decision(False, migrate_seconds, break_even, why)
