"""`vmmesh run`: a command in a fresh VM with the packages it needs, or a bag of tasks."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from vmmesh.api.common import Progress
from vmmesh.config import Config
from vmmesh.errors import InternalError, JobInputError, UsageError, VmmeshError
from vmmesh.jobs import client as jobs
from vmmesh.jobs.bag import Outcome
from vmmesh.net.control import connect_control
from vmmesh.nurseries import open_nursery

from .cmd_vm import _fetch_policy, read_custom_zip
from .output import console, err_console, error_line, print_json, progress_view, table


def _spec(args: argparse.Namespace, argv: list[str]) -> jobs.JobSpec:
    if not argv:
        raise UsageError("usage: vmmesh run [OPTIONS] -- COMMAND [ARG...]")
    for name in args.outputs or []:
        if name.startswith("/") or ".." in Path(name).parts:
            raise UsageError(f"--output {name}: a path inside the job directory")
    return jobs.JobSpec(
        argv=tuple(argv),
        packages=frozenset(args.packages or []),
        custom_zip=read_custom_zip(args.custom),
        inputs=tuple(Path(p) for p in args.inputs or []),
        outputs=tuple(args.outputs or []),
        vcpus=args.cpus,
        memory_mb=args.memory,
        timeout=float(args.timeout or 0),
        keep=bool(args.keep),
        fetch=_fetch_policy(args),
    )


def run(args: argparse.Namespace, cfg: Config) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv.pop(0)
    spec = _spec(args, argv)
    try:
        if args.tasks is not None:
            return trio.run(_bag, cfg, spec, args)
        return trio.run(_one, cfg, spec, args)
    except (UsageError, InternalError):
        raise  # main's one line and status (2; 70 for a bug)
    except VmmeshError as exc:
        error_line(str(exc))
        return jobs.exit_status_of(exc)


async def _signals_end(scope: trio.CancelScope) -> None:
    """SIGTERM and SIGINT end the job cleanly: its VM goes (the session's call ends)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            error_line(f"{signal.Signals(signum).name}: ending the job, its VM is shut down")
            scope.cancel()
            return


async def _one(cfg: Config, spec: jobs.JobSpec, args: argparse.Namespace) -> int:
    jobs.check_inputs(spec.inputs)
    show = not args.json and sys.stderr.isatty()
    result: jobs.JobResult | None = None
    with progress_view(show) as view, trio.CancelScope() as scope:
        async with open_nursery() as nursery:
            nursery.start_soon(_signals_end, scope)
            async with connect_control(cfg.socket_path) as conn:
                sink = view.update if view else None
                out = sys.stdout.buffer
                result = await jobs.run_job(conn, spec, out=out, err=sys.stderr.buffer,
                                            dest=Path.cwd(), progress=sink)  # fmt: skip
            nursery.cancel_scope.cancel()
    if result is None:
        return 128 + signal.SIGTERM
    return _finish(result, args)


def _finish(result: jobs.JobResult, args: argparse.Namespace) -> int:
    if args.json:
        print_json(jobs.result_json(result))
    for name in result.missing:
        error_line(f"the command made no {name!r} (asked with --output)")
    if result.timed_out:
        error_line(f"--timeout reached: the command was killed after {result.run_seconds:.0f} s")
        return jobs.EXIT_TIMEOUT
    if result.missing and result.exit_code == 0:
        return jobs.EXIT_NOOUTPUT
    if result.exit_code > 128 and not args.json:
        with contextlib.suppress(ValueError):
            error_line(f"the command was killed by {signal.Signals(result.exit_code - 128).name}")
    return result.exit_code if 0 <= result.exit_code <= 255 else jobs.EXIT_FAILURE


async def _bag(cfg: Config, spec: jobs.JobSpec, args: argparse.Namespace) -> int:
    tasks_dir = Path(args.tasks)
    if not tasks_dir.is_dir():
        raise JobInputError(f"no such input directory: {tasks_dir}")
    tasks = sorted(p for p in tasks_dir.iterdir() if p.is_file())
    if not tasks:
        raise UsageError(f"{tasks_dir} holds no task files")
    if not any("{}" in a for a in spec.argv):
        raise UsageError("a bag's command needs {} where the task file goes")
    results = Path(args.results or "results")
    results.mkdir(parents=True, exist_ok=True)
    show = not args.json and sys.stderr.isatty()
    with progress_view(show) as view:
        counted = _counter(view.update if view else None)
        async with connect_control(cfg.socket_path) as conn:
            report = await jobs.run_bag(
                conn, spec, tasks, int(args.vms or 1), results,
                progress=view.update if view else None, on_outcome=counted,
            )  # fmt: skip
    return _summary(report, args)


def _counter(sink: Callable[[Progress], None] | None) -> Callable[[Outcome, int], None]:
    done: list[Outcome] = []

    def counted(outcome: Outcome, total: int) -> None:
        done.append(outcome)
        if sink is not None:
            sink(Progress(task="tasks", phase=f"{len(done)}/{total} done",
                          fraction=len(done) / total))  # fmt: skip

    return counted


def _summary(report: jobs.BagResult, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = [
        {"task": o.task, "vm": o.vm, "host": o.host, "seconds": o.seconds,
         "exit_code": o.exit_code, "attempts": o.attempts, "note": o.note}
        for o in report.outcomes
    ]  # fmt: skip
    failed = [r for r in rows if r["exit_code"] != 0]
    if args.json:
        print_json({"tasks": rows, "seconds": report.seconds, "failed": len(failed),
                    "vms": [v.name for v in report.vms]})  # fmt: skip
    else:
        table(
            f"{len(rows)} tasks over {len(report.vms)} VM(s) in {report.seconds:.1f} s",
            ["task", "VM", "host", "seconds", "exit", "note"],
            [(r["task"], r["vm"], r["host"], f"{r['seconds']:.1f}", r["exit_code"], r["note"])
             for r in rows],
        )  # fmt: skip
        if report.unplaced:
            console.print(f"[yellow]fewer VMs than asked[/]: {report.unplaced}")
        err_console.print(f"results in {Path(args.results or 'results')}/<task>/")
    return 1 if failed else 0
