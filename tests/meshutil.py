"""Helpers for tests that drive lab hosts through the real CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from vmmesh.lab import Lab

T = TypeVar("T")

# How long a liveness wait may last before the test fails with the last state
# seen.  Not a performance bound: the machines are shared and noisy.
PATIENCE = 120.0


def cli_json(lab: Lab, i: int, *args: str) -> Any:
    out = lab.cli(i, *args, "--json").stdout
    return json.loads(out)


def host_field(lab: Lab, viewer: int, host: str, *path: str) -> Any:
    """What host ``viewer`` believes about ``host``: a field of its peers row."""
    value: Any = peers(lab, viewer)[host]
    for key in path:
        value = value[key]
    return value


def field_is(lab: Lab, viewer: int, host: str, path: tuple[str, ...], want: object) -> bool:
    return bool(host_field(lab, viewer, host, *path) == want)


def all_up(lab: Lab, viewer: int, count: int = 3) -> bool:
    view = peers(lab, viewer)
    return len(view) == count and all(h["status"] == "up" for h in view.values())


def peers(lab: Lab, i: int) -> dict[str, dict[str, Any]]:
    """Host i's view: name -> row."""
    return {h["name"]: h for h in cli_json(lab, i, "peers")["hosts"]}


def eventually(
    check: Callable[..., T | None], what: str, *args: Any, patience: float = PATIENCE
) -> T:
    """Poll ``check(*args)`` until it returns something truthy; fail with ``what``."""
    deadline = time.monotonic() + patience
    last: object = None
    while True:
        try:
            result = check(*args)
        except Exception as exc:  # a node restarting may refuse a call
            result, last = None, exc
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what} (last: {last!r})")
        time.sleep(0.25)


def failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test of ``request`` failed (conftest keeps each phase's report)."""
    report = getattr(request.node, "report_call", None)
    return report is not None and bool(report.failed)


def base_warm(lab: Lab, i: int) -> bool:
    """Host ``i`` holds a whole warm state of its default base image (a node makes it
    when it takes the image up; builds and package-less VMs resume it)."""
    data = lab.host_data_dir(i)
    try:
        image_id = (data / "images" / "default").read_text().strip()
    except OSError:
        return False
    return bool(image_id) and (data / "warm" / image_id / "shape.json").is_file()
