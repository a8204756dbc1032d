"""`vmmesh web`: a single-use login link for a browser, as Jupyter and Cockpit print one."""

from __future__ import annotations

import argparse
import time

from vmmesh.api.codec import Empty
from vmmesh.api.web import LOGIN
from vmmesh.config import Config

from . import client
from .output import console, print_json


def web(args: argparse.Namespace, cfg: Config) -> int:
    reply = client.call(cfg, LOGIN, Empty())
    if args.json:
        print_json(reply)
        return 0
    left = max(0, round((reply.expires - time.time()) / 60))
    console.print(
        f"Open this link in a browser on this host (good once, for {left} min; the session "
        "lasts 12 h, or until this node restarts):",
        soft_wrap=True,
    )
    print(reply.url)
    return 0
