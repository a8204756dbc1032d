"""ssh public keys, known_hosts lines, port choice and the connect address: pure."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fakehv import FAKE_HOST_KEY
from vmmesh.api.vm import MAX_KEYS
from vmmesh.errors import UsageError
from vmmesh.host.sshkeys import (
    check_public_key,
    check_public_keys,
    connect_address,
    known_hosts_line,
    pick_port,
)


def _key(kind: str = "ssh-ed25519", body: bytes = bytes(32), comment: str = "") -> str:
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", len(body)) + body
    text = f"{kind} {base64.b64encode(blob).decode()}"
    return f"{text} {comment}" if comment else text


def test_a_key_with_a_comment_is_kept_and_normalised() -> None:
    key = _key(comment="alice@laptop  home")
    assert check_public_key(f"  {key}\n") == key
    assert check_public_key(FAKE_HOST_KEY) == FAKE_HOST_KEY


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "one line"),
        ("ssh-ed25519", "not an OpenSSH public key"),
        ("ssh-dss AAAA", "not an OpenSSH public key"),
        ('command="rm -rf /" ' + _key(), "not an OpenSSH public key"),
        ("ssh-ed25519 not!base64", "bad base64"),
        ("ssh-ed25519 AAAA", "too short"),
        (_key("ssh-rsa").replace("ssh-rsa", "ssh-ed25519", 1), "does not hold"),
        (_key() + "\nssh-ed25519 AAAA", "control characters"),
        ("ssh-ed25519 " + "A" * 20_000, "16 KiB"),
    ],
)
def test_anything_but_one_key_line_is_refused(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        check_public_key(text)


def test_key_lists_are_bounded_and_deduplicated() -> None:
    a, b = _key(body=b"a" * 32), _key(body=b"b" * 32)
    assert check_public_keys([a, b, a]) == (a, b)
    with pytest.raises(UsageError, match="at least one"):
        check_public_keys([])
    with pytest.raises(UsageError, match="at least one"):
        check_public_keys(a)
    with pytest.raises(UsageError, match="at most"):
        check_public_keys([a] * (MAX_KEYS + 1))


def test_known_hosts_line_pins_the_key_without_its_comment() -> None:
    key = _key(comment="root@guest")
    kind, blob = key.split()[:2]
    assert known_hosts_line("10.0.0.2", 22001, key) == f"[10.0.0.2]:22001 {kind} {blob}\n"
    assert known_hosts_line("10.0.0.2", 22, key) == f"10.0.0.2 {kind} {blob}\n"
    with pytest.raises(UsageError):
        known_hosts_line("10.0.0.2", 22001, "ssh-ed25519 AAAA")


@given(st.sets(st.integers(22000, 22010)), st.sets(st.integers(22000, 22010)))
def test_pick_port_takes_the_lowest_free_one(used: set[int], busy: set[int]) -> None:
    ports = range(22000, 22011)
    port = pick_port(ports, used, lambda p: p not in busy)
    free = [p for p in ports if p not in used and p not in busy]
    assert port == (free[0] if free else 0)


def test_no_range_means_no_forward() -> None:
    assert pick_port(range(0), []) == 0


def test_connect_address() -> None:
    assert connect_address(True, "0.0.0.0", "10.0.0.2") == "127.0.0.1"
    assert connect_address(True, "127.0.0.1", "10.0.0.2") == "127.0.0.1"
    assert connect_address(False, "0.0.0.0", "10.0.0.2") == "10.0.0.2"
    assert connect_address(False, "0.0.0.0", "10.0.0.2:7400") == "10.0.0.2"
    assert connect_address(False, "0.0.0.0", "[fd00::2]:7400") == "fd00::2"
    assert connect_address(False, "192.168.1.5", "10.0.0.2") == "192.168.1.5"
    with pytest.raises(UsageError, match="loopback only"):
        connect_address(False, "127.0.0.1", "10.0.0.2")
    with pytest.raises(UsageError, match="no known address"):
        connect_address(False, "0.0.0.0", "")
