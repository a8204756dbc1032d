"""The CLI's own argument handling (no node needed): exec and ssh after NAME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmmesh.errors import InternalError, StateError, UsageError
from vmmesh_cli.cmd_vm import _options_then_command, _ssh_identity
from vmmesh_cli.main import build_parser, main, parse_argv


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


def test_a_data_dir_the_user_may_not_enter_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    (locked / "data").mkdir(parents=True)
    locked.chmod(0)
    try:
        if os.access(locked, os.X_OK):
            pytest.skip("root may enter any directory: run as another user to see it")
        assert main(["--data-dir", str(locked / "data"), "status"]) == 1
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vmmesh: error: ")
    assert "Traceback" not in err


def test_join_with_a_garbage_token_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "fresh"
    assert main(["--data-dir", str(data), "join", "garbage"]) == 1
    assert not data.exists(), "refused before anything was made"
    err = capsys.readouterr().err
    assert err.startswith("vmmesh: error: ") and "join token" in err


def test_shutdown_of_nothing_and_bad_names_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data-dir", str(tmp_path), "shutdown", "../x"]) == 2
    assert "VM name" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "request", "web", "0"]) == 2
    assert main(["--data-dir", str(tmp_path), "request", "web", "1", "Bad Pkg"]) == 2
    assert "package name" in capsys.readouterr().err


def test_a_bug_says_so_with_its_own_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An InternalError is not the user's fault: status 70 (EX_SOFTWARE) and where
    the log is, from any command and from `run` (whose other failures are 71)."""
    from vmmesh_cli import cmd_run, cmd_vm

    def broken(*_args: object) -> int:
        raise InternalError("the wave is not answered yet")

    async def broken_job(*_args: object) -> int:
        raise InternalError("no open ask")

    async def fails(*_args: object) -> int:
        raise StateError("cannot write the state")  # another failure, not a bug

    monkeypatch.setattr(cmd_vm, "vms", broken)
    assert main(["--data-dir", str(tmp_path), "vms"]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vmmesh: error: a bug in vmmesh: ")
    assert "journalctl -u vmmesh-node" in err
    monkeypatch.setattr(cmd_run, "_one", broken_job)
    assert main(["--data-dir", str(tmp_path), "run", "--", "true"]) == 70
    assert "a bug in vmmesh" in capsys.readouterr().err
    monkeypatch.setattr(cmd_run, "_one", fails)
    assert main(["--data-dir", str(tmp_path), "run", "--", "true"]) == 71


def test_peers_shows_each_hosts_work_in_one_line() -> None:
    from vmmesh.api.host import WorkItem, WorkKind
    from vmmesh_cli.cmd_peers import work_line

    move = WorkItem(kind=WorkKind.MIGRATION, name="web-1", phase="ram", fraction=0.4,
                    done=40 << 20, total=100 << 20, rate=12e6, peer="h3", started=90.0)  # fmt: skip
    assert work_line(move, 100.0) == (
        "moving web-1 to h3: 40 MB of 100 MB (40%), 12.0 MB/s, ram, started 10.0s ago"
    )
    job = WorkItem(kind=WorkKind.JOB, name="bag", done=7, total=20, failed=1, vms=2)
    assert work_line(job, 0.0) == "job bag: 7 of 20 commands, 1 failed on 2 VMs"


def test_a_requests_packages_may_follow_its_options() -> None:
    parser = build_parser()
    args = parse_argv(
        parser, ["request", "web", "2", "--keep-alive", "nginx", "--memory", "1024", "perl"]
    )
    assert (args.packages, args.keep_alive, args.memory) == (["nginx", "perl"], True, 1024)
    assert parse_argv(parser, ["request", "web", "1"]).packages == []
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        parse_argv(parser, ["request", "web", "1", "nginx", "--bogus"])
    with pytest.raises(UsageError, match="unrecognized arguments: extra"):
        parse_argv(parser, ["status", "extra"])
