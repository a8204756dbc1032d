"""The CLI's own argument handling (no node needed): exec and ssh after NAME."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmmesh.errors import UsageError
from vmmesh_cli.cmd_vm import _options_then_command, _ssh_identity
from vmmesh_cli.main import build_parser


def _split(*argv: str) -> tuple[list[str], bool, Path | None]:
    args = build_parser().parse_args(list(argv))
    command = _options_then_command(args, identity=args.command == "ssh")
    return command, args.json, getattr(args, "identity", None)


def test_options_after_name_are_ours_until_the_double_dash() -> None:
    assert _split("ssh", "web", "-i", "k", "--json") == ([], True, Path("k"))
    assert _split("ssh", "-i", "k", "web", "--", "ls", "-l", "--json") == (
        ["ls", "-l", "--json"],
        False,
        Path("k"),
    )
    assert _split("ssh", "web") == ([], False, None)
    assert _split("exec", "web", "--json", "--", "cat", "/etc/hostname") == (
        ["cat", "/etc/hostname"],
        True,
        None,
    )
    assert _split("exec", "web", "--", "sh", "-c", "echo -i") == (
        ["sh", "-c", "echo -i"],
        False,
        None,
    )
    assert _split("exec", "web", "uname", "-a") == (["uname", "-a"], False, None)


def test_unknown_option_before_the_command_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown option '-x'"):
        _split("exec", "web", "-x", "--", "true")
    with pytest.raises(UsageError, match="unknown option '-i'"):
        _split("exec", "web", "-i", "k", "--", "true")


def test_ssh_identity_needs_both_halves(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("private")
    with pytest.raises(UsageError, match=r"needs .*k\.pub"):
        _ssh_identity(key)
    (tmp_path / "k.pub").write_text("not a key")
    with pytest.raises(UsageError, match="not an OpenSSH public key"):
        _ssh_identity(key)
