from pathlib import Path

import pytest

from vmmesh.errors import TokenError
from vmmesh.host.store import Store
from vmmesh.mesh.invites import InviteBook


def _book(tmp_path: Path) -> InviteBook:
    return InviteBook(Store.open(tmp_path / "state.db"))


def test_invite_works_once(tmp_path: Path) -> None:
    book = _book(tmp_path)
    book.add("aa" * 16, now=100.0, expires=200.0)
    book.consume("aa" * 16, now=150.0)
    with pytest.raises(TokenError, match="already used"):
        book.consume("aa" * 16, now=151.0)


def test_invite_expires(tmp_path: Path) -> None:
    book = _book(tmp_path)
    book.add("bb" * 16, now=100.0, expires=200.0)
    with pytest.raises(TokenError, match="expired"):
        book.consume("bb" * 16, now=201.0)


def test_unknown_invite(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="unknown"):
        _book(tmp_path).consume("cc" * 16, now=1.0)


def test_used_invite_survives_reopen(tmp_path: Path) -> None:
    book = _book(tmp_path)
    book.add("dd" * 16, now=100.0, expires=200.0)
    book.consume("dd" * 16, now=110.0)
    with pytest.raises(TokenError, match="already used"):
        _book(tmp_path).consume("dd" * 16, now=120.0)
