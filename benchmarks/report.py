"""How a lab benchmark prints its result: a table for a person, JSON with ``--json``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def print_result(
    result: dict[str, Any], args: argparse.Namespace, table: Callable[[dict[str, Any]], None]
) -> int:
    """Print ``result`` as ``table`` does, or as JSON if ``args.json``; the exit status (0)."""
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        table(result)
    return 0
