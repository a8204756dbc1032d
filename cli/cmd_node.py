"""`vmmesh node`: the daemon in the foreground."""

from __future__ import annotations

import argparse
import logging

import trio

from vmmesh.config import Config, load_config
from vmmesh.jobs.service import JobService
from vmmesh.keepalive.service import KeepAliveService
from vmmesh.migrate.service import MigrateService
from vmmesh.node import Node
from vmmesh.transfer.service import TransferService
from vmmesh.vmservice.service import VmService
from vmmesh.web.service import WebService


def node(args: argparse.Namespace, cfg: Config) -> int:
    level = logging.DEBUG if args.verbose > 1 else getattr(logging, cfg.log_level.upper(), 20)
    logging.getLogger().setLevel(level)
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    flags = dict(args.config_flags)

    def reload() -> Config:
        return load_config(flags, config_file=args.config)

    vms = VmService()
    migrate = MigrateService(vms)
    transfers = TransferService(vms)
    jobs = JobService(vms)
    extensions = [
        vms,
        transfers,
        jobs,
        migrate,
        KeepAliveService(vms),
        WebService(guests=vms, transfers=transfers, migrations=migrate, jobs=jobs),
    ]
    n = Node(cfg, reload=reload, extensions=extensions)
    try:
        trio.run(n.run)
    except KeyboardInterrupt:
        logging.getLogger("vmmesh.node").info("interrupted; stopped")
    return 0
