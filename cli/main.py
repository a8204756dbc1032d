"""`vmmesh` entry point: parse arguments, load config, dispatch, print errors as one line.

The CLI is thin.  Commands that act on the running mesh talk to the local node
over its Unix control socket (``cli/client.py``); only ``init``, ``join``,
``node``, ``lab`` and ``image`` work on the data directory directly, because
they run before a node exists or *are* the node.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmmesh.config import Config, load_config
from vmmesh.errors import InternalError, UsageError, VmmeshError

from .output import EXIT_BUG, NODE_LOG, bug_line, error_line

Command = Callable[[argparse.Namespace, Config], int]

EXIT_HELP = f"""\
exit status (`vmmesh run` has its own: vmmesh run --help):
   0  done
   1  a failure (the line on stderr says which)
   2  bad arguments or input
  {EXIT_BUG}  a bug in vmmesh: please report it with the node's log
      ({NODE_LOG})
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> Any:
        raise UsageError(message)


def _common_options(suppress: bool) -> _Parser:
    """Global options, accepted before or after the command.

    On subcommands their defaults are suppressed, so that a value given
    before the command is not reset by the subparser.
    """
    p = _Parser(add_help=False)
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--json", action="store_true", help="machine-readable output", **d)
    p.add_argument("--data-dir", type=Path, help="node data directory (/var/lib/vmmesh)", **d)
    p.add_argument("--config", type=Path, help="TOML config file", **d)
    p.add_argument("-v", "--verbose", action="count", **(d or {"default": 0}))
    return p


Adder = Callable[[str, str, str], argparse.ArgumentParser]


def _mesh_commands(add: Adder) -> None:
    p = add("init", "cmd_mesh:init", "create a new mesh: its CA and this host's certificate")
    p.add_argument("--name", help="this host's name (default: hostname)")
    p = add("invite", "cmd_mesh:invite", "print a single-use join token")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (3600)")
    p = add("join", "cmd_mesh:join", "join a mesh with a token from `vmmesh invite`")
    p.add_argument("token")
    p.add_argument("--name", help="this host's name (default: hostname)")
    p = add("remove", "cmd_mesh:remove", "revoke a host (by name or node id)")
    p.add_argument("host")
    p = add(
        "cert",
        "cmd_cert:cert",
        "issue or revoke a client certificate for the web page, /metrics and /sd "
        "(host with the CA key)",
    )
    p.add_argument("action", choices=["issue", "revoke"])
    p.add_argument(
        "what",
        nargs="?",
        metavar="CERT|SERIAL",
        help="revoke: the certificate's PEM file or its serial (hex, as issue printed it)",
    )
    p.add_argument("--role", choices=["viewer", "metrics"], help="issue: what it may read")
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write PEMs")
    p.add_argument(
        "--p12",
        type=Path,
        metavar="FILE",
        help="a PKCS#12 bundle for a browser (its password is printed once)",
    )
    p.add_argument("--label", help="a name for whom it is for (default: the role)")
    add("web", "cmd_web:web", "print a single-use login link to this host's web page")
    add("peers", "cmd_peers:peers", "list the hosts of the mesh")
    add("status", "cmd_peers:status", "show this node's state and what it refused")


def _node_commands(add: Adder) -> None:
    p = add("node", "cmd_node:node", "run the node daemon in the foreground")
    p.add_argument("--name")
    p.add_argument("--listen", help="address to bind the peer port on (0.0.0.0)")
    p.add_argument("--advertise", action="append", help="address to advertise (repeatable)")
    p.add_argument("--port", type=int, help="peer port (7400); join port is port+1")
    p.add_argument(
        "--peer", action="append", dest="peers", metavar="ADDR:PORT", help="static seed peer"
    )
    p.add_argument("--no-mdns", dest="mdns", action="store_const", const=False)
    p.add_argument("--storage-quota", dest="storage_quota_mb", type=int, metavar="MB")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    p.add_argument(
        "--apt-source",
        dest="apt_sources",
        action="append",
        metavar="LINE",
        help="apt source line for guests (repeatable)",
    )
    p.add_argument("--gossip-interval", type=float)
    p = add("lab", "cmd_lab:lab", "a lab of hosts on this machine (network namespaces; root)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("count", type=int, nargs="?", default=3)
    p.add_argument("--dir", type=Path, default=Path("/tmp/vmmesh-lab"), help="lab directory")
    p.add_argument("--tag", default="lab", help="short name used in namespace names")
    p.add_argument("--node-arg", action="append", default=[], help="extra `vmmesh node` argument")
    p.add_argument("--image", type=Path, help="base image directory to give every host")
    p = add("image", "cmd_image:image", "build, import, export, fetch or list base images")
    p.add_argument("action", choices=["build", "import", "export", "fetch", "list"])
    p.add_argument("path", nargs="?", type=Path)
    p.add_argument("--id", dest="image_id", help="image id (export)")


def _vm_commands(add: Adder) -> None:
    p = add("request", "cmd_vm:request", "create COUNT VMs named NAME with packages")
    p.add_argument("name")
    p.add_argument("count", type=int)
    p.add_argument("packages", nargs="*")
    p.add_argument("--custom", type=Path, metavar="FILE.zip", help="zip extracted to /opt")
    p.add_argument("--dry-run", action="store_true", help="show the placement plan only")
    p.add_argument("--vcpus", type=int)
    p.add_argument("--memory", type=int, metavar="MB")
    p.add_argument("--fetch", action="store_true", help="fetch missing templates from peers")
    p.add_argument("--install", action="store_true", help="install missing packages locally")
    p.add_argument(
        "--keep-alive",
        action="store_true",
        help="restart the VMs if QEMU ends without an order; recover them elsewhere if "
        "their host dies (needs 3+ hosts)",
    )
    p = add("fetch", "cmd_transfer:fetch", "fetch a template from the peers that hold it")
    p.add_argument("template", help="template id (or its start) as `vmmesh templates` shows")
    p.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        metavar="HOST",
        help="only from this host (repeat for several); default: every holder",
    )
    _run_command(add)
    p = add("migrate", "cmd_migrate:migrate", "move a running VM to another host (live)")
    p.add_argument("vm", help="the VM's full name, as `vmmesh vms` shows it (NAME-<n>)")
    p.add_argument("--to", default="", metavar="HOST", help="the target host (default: picked)")
    p.add_argument(
        "--offline", action="store_true", help="pause, save and send the state, resume there"
    )
    p = add("drain", "cmd_migrate:drain", "move HOST's VMs away; it takes no new VM")
    p.add_argument("host", nargs="?", default="", help="host name or node id (default: this)")
    p = add("undrain", "cmd_migrate:undrain", "let HOST take VMs again")
    p.add_argument("host", nargs="?", default="", help="host name or node id (default: this)")
    p.add_argument(
        "--bring-back", action="store_true", help="move back the VMs that left it while draining"
    )
    add("vms", "cmd_vm:vms", "list the VMs of the mesh")
    add("templates", "cmd_vm:templates", "list the templates of the mesh")
    p = add("shutdown", "cmd_vm:shutdown", "stop and delete every VM called NAME in the mesh")
    p.add_argument("name")
    p = add("exec", "cmd_vm:exec_", "run a command in a VM (vmmesh exec NAME -- CMD...)")
    p.add_argument("name")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p = add(
        "ssh",
        "cmd_vm:ssh",
        "ssh into a VM as root (vmmesh ssh NAME [-i KEY] [-- COMMAND...]); "
        "--json prints the address, port and host key instead",
    )
    p.add_argument("name")
    p.add_argument(
        "-i",
        dest="identity",
        type=Path,
        metavar="KEY",
        help="private key with KEY.pub beside it (default: ~/.ssh/id_ed25519, id_ecdsa, id_rsa)",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER)


def _run_command(add: Adder) -> None:
    from vmmesh.jobs.client import EXIT_HELP

    p = add("run", "cmd_run:run", "run a command in a fresh VM with the packages it needs")
    p.epilog = EXIT_HELP
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--pkg", dest="packages", action="append", metavar="P", help="package")
    p.add_argument("--custom", type=Path, metavar="FILE.zip", help="zip extracted to /opt")
    p.add_argument("--input", dest="inputs", action="append", metavar="F", help="input file")
    p.add_argument(
        "--output",
        dest="outputs",
        action="append",
        metavar="F",
        help="output to bring back (default: whatever the command made)",
    )
    p.add_argument("--cpus", type=int)
    p.add_argument("--memory", type=int, metavar="MB")
    p.add_argument("--timeout", type=float, metavar="S", help="kill the command after S seconds")
    p.add_argument("--keep", action="store_true", help="leave the VM running for a look")
    p.add_argument("--tasks", metavar="DIR", help="a bag of tasks: run once per file of DIR")
    p.add_argument("--vms", type=int, metavar="N", help="VMs for the bag (1)")
    p.add_argument("--results", metavar="DIR", help="where each task's results go (results)")
    p.add_argument("--fetch", action="store_true", help="fetch missing templates from peers")
    p.add_argument("--install", action="store_true", help="install missing packages locally")
    p.add_argument("argv", nargs=argparse.REMAINDER)


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(suppress=True)
    parser = _Parser(
        prog="vmmesh",
        description="A peer-to-peer mesh of hosts running on-demand VMs.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(suppress=False)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, target: str, help_: str) -> argparse.ArgumentParser:
        """A command; ``target`` is "module:function", imported only when it runs."""
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(target=target)
        return p

    _mesh_commands(add)
    _node_commands(add)
    _vm_commands(add)
    return parser


def _config_flags(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "data_dir",
        "name",
        "listen",
        "advertise",
        "port",
        "peers",
        "mdns",
        "storage_quota_mb",
        "accel",
        "apt_sources",
        "gossip_interval",
    )
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def parse_argv(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that a request's packages may follow its options
    (`request web 2 --keep-alive nginx`): argparse fills a ``*`` positional once,
    before the first option, and would refuse the rest as unrecognized."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        if getattr(args, "target", None) == "cmd_vm:request" and not any(
            e.startswith("-") for e in extras
        ):
            args.packages = [*args.packages, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parse_argv(parser, argv)
        if not getattr(args, "target", None):
            parser.print_help()
            return 2
        logging.basicConfig(
            level=logging.DEBUG
            if args.verbose > 1
            else logging.INFO
            if args.verbose
            else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        args.config_flags = _config_flags(args)
        cfg = load_config(args.config_flags, config_file=args.config)
        module, _, function = args.target.partition(":")
        func: Command = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        return func(args, cfg)
    except UsageError as exc:
        error_line(str(exc))
        return 2
    except InternalError as exc:
        bug_line(exc)
        return EXIT_BUG
    except VmmeshError as exc:
        error_line(str(exc))
        return 1
    except PermissionError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        error_line(f"permission denied{where} (run as root or as a member of group vmmesh)")
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        error_line(f"{exc.strerror or exc}{where}")
        return 1
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130


def entry() -> None:
    sys.exit(main())
