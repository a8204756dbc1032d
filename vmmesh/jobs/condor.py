"""HTCondor's side of things (thesis §3.3, §4.3): its argument syntax, and the wrapper's argv.

A submit description names ``vmmesh-condor`` as its ``executable`` and gives
``arguments`` in the thesis's form ``PKG... # COMMAND ARGS``.  Condor splits
``arguments`` itself and hands the wrapper an argv; ``parse_arguments``
does the same split (to test the wrapper with exactly what Condor passes,
and for ``vmmesh-condor --arguments`` by hand).  The new syntax: the value is
enclosed in double quotes; whitespace separates arguments; single quotes
group words, spaces included; inside them, ``''`` is a literal single quote;
``""`` is a literal double quote anywhere.  Without the enclosing double
quotes (the old syntax), arguments are separated by whitespace and ``\\"``
is a literal double quote.
"""

from __future__ import annotations

from vmmesh.api.names import PACKAGE_NAME
from vmmesh.errors import UsageError

# What Condor itself puts in a job's scratch directory: never a job input.
CONDOR_FILES = frozenset(
    {
        "_condor_stdout",
        "_condor_stderr",
        ".job.ad",
        ".machine.ad",
        ".chirp.config",
        ".update.ad",
        "condor_exec.exe",
        ".docker_sock",
    }
)


def parse_arguments(value: str) -> list[str]:
    """An ``arguments =`` value as Condor splits it into argv."""
    text = value.strip()
    if not (len(text) >= 2 and text[0] == '"' and text[-1] == '"'):
        return [a.replace('\\"', '"') for a in text.split()]
    body = text[1:-1]
    args: list[str] = []
    current: list[str] = []
    has_arg = False
    i = 0
    quoted = False
    while i < len(body):
        c = body[i]
        if c == '"':
            if body[i : i + 2] != '""':
                raise UsageError('a double quote inside arguments must be doubled ("")')
            current.append('"')
            has_arg = True
            i += 2
            continue
        if c == "'":
            if quoted and body[i : i + 2] == "''":
                current.append("'")
                i += 2
                continue
            quoted = not quoted
            has_arg = True
            i += 1
            continue
        if c.isspace() and not quoted:
            if has_arg:
                args.append("".join(current))
                current, has_arg = [], False
            i += 1
            continue
        current.append(c)
        has_arg = True
        i += 1
    if quoted:
        raise UsageError("arguments end inside a single-quoted group")
    if has_arg:
        args.append("".join(current))
    return args


def split_packages(argv: list[str]) -> tuple[list[str], list[str]]:
    """``PKG... # COMMAND ARGS`` -> (packages, command)."""
    if "#" not in argv:
        raise UsageError("arguments must read PKG... # COMMAND [ARGS...] (no '#' found)")
    at = argv.index("#")
    packages, command = argv[:at], argv[at + 1 :]
    if not command:
        raise UsageError("nothing after '#': the job needs a command")
    for p in packages:
        if not PACKAGE_NAME.match(p):
            raise UsageError(f"{p!r} is not a package name (packages come before '#')")
    return packages, command
