"""`vmmesh-condor`: the thesis's HTCondor wrapper (§4.3), an executable a vanilla-universe
submit description names, with ``arguments = "PKG... # COMMAND ARGS"``.

In the job's scratch directory (``$_CONDOR_SCRATCH_DIR``, else the current
one) it sends every file Condor transferred into a fresh VM that has the
packages, runs the command there, brings back the files the command created
or changed at the top of its working directory, writes the command's stdout
and stderr to its own (Condor's ``output`` and ``error`` capture them) and
exits with the command's status.  It talks to the vmmesh node of its host
(``$VMMESH_DATA_DIR``, default /var/lib/vmmesh).  With ``$VMMESH_CONDOR_REPORT``
set (in the submit description's ``environment``), it writes there how the
job went, as JSON: VM, host, warm or cold start, the phases of getting the VM
and the seconds of each part.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from vmmesh.config import load_config
from vmmesh.errors import InternalError, UsageError, VmmeshError
from vmmesh.jobs import client as jobs
from vmmesh.jobs.condor import CONDOR_FILES, parse_arguments, split_packages
from vmmesh.net.control import connect_control

from .output import bug_line, error_line


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(f"usage: vmmesh-condor PKG... '#' COMMAND [ARG...]\n{__doc__}{jobs.EXIT_HELP}")
        return 0
    try:
        if args[:1] == ["--arguments"] and len(args) == 2:
            args = parse_arguments(args[1])  # by hand: the submit line as written
        packages, command = split_packages(args)
        scratch = Path(os.environ.get("_CONDOR_SCRATCH_DIR") or os.getcwd())
        inputs = tuple(
            p for p in sorted(scratch.iterdir())
            if p.is_file() and p.name not in CONDOR_FILES and not p.name.startswith(".vmmesh-")
        )  # fmt: skip
        spec = jobs.JobSpec(argv=tuple(command), packages=frozenset(packages), inputs=inputs)
        cfg = load_config({})
        return trio.run(_run, cfg.socket_path, spec, scratch)
    except UsageError as exc:
        error_line(f"vmmesh-condor: {exc}")
        return 2
    except InternalError as exc:
        bug_line(exc)
        return jobs.exit_status_of(exc)
    except VmmeshError as exc:
        error_line(f"vmmesh-condor: {exc}")
        return jobs.exit_status_of(exc)


async def _run(socket: Path, spec: jobs.JobSpec, scratch: Path) -> int:
    async with connect_control(socket) as conn:
        result = await jobs.run_job(
            conn, spec, out=sys.stdout.buffer, err=sys.stderr.buffer, dest=scratch
        )
    report = os.environ.get("VMMESH_CONDOR_REPORT")
    if report:
        Path(report).write_text(json.dumps(jobs.result_json(result)) + "\n")
    return result.exit_code if 0 <= result.exit_code <= 255 else jobs.EXIT_FAILURE


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
