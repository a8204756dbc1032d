"""The typed bodies: every one round-trips, and nothing a peer sends gets past
``from_wire`` except a valid body or the peer-misbehaved error."""

from __future__ import annotations

import contextlib
import io
import zipfile
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.apistrategies import ANY_VALUE, body, body_classes
from vmmesh.api import codec
from vmmesh.api.codec import Empty, Int, Message, Record, Text, wire
from vmmesh.api.customzip import CheckedZip, checked_zip
from vmmesh.api.host import Capacity, TemplateInfo
from vmmesh.api.vm import RequestVms, ShareReply, ShareRequest
from vmmesh.errors import (
    ErrorCode,
    InternalError,
    MalformedMessage,
    PackageInstallError,
    RemoteError,
    UnknownMessage,
    UsageError,
    VmmeshError,
    error_code,
    from_code,
)

CLASSES = body_classes()


def test_the_api_has_bodies() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"RequestVms", "ShareRequest", "StatusReply", "Capacity", "JoinRequest"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=30)
@given(data=st.data())
def test_round_trip_through_msgpack(cls: type[Record], data: st.DataObject) -> None:
    value = data.draw(body(cls))
    wire_form = msgpack.unpackb(msgpack.packb(value.to_wire(), use_bin_type=True), raw=False)
    assert cls.from_wire(wire_form) == value
    assert value.checked() == value


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=40)
@given(data=st.data())
def test_mutated_bodies_are_refused_with_the_peer_error_only(
    cls: type[Record], data: st.DataObject
) -> None:
    wire_form: dict[str, Any] = data.draw(body(cls)).to_wire()
    keys = sorted(wire_form) or ["x"]
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from([*keys, "extra"]))
        if data.draw(st.booleans()):
            wire_form.pop(key, None)
        else:
            wire_form[key] = data.draw(ANY_VALUE)
    try:
        cls.from_wire(wire_form)
    except (MalformedMessage, UnknownMessage) as exc:
        assert str(exc).strip(), "a refusal always says why"


@given(ANY_VALUE)
def test_anything_at_all_is_refused_or_parsed(value: Any) -> None:
    for cls in CLASSES:
        with contextlib.suppress(MalformedMessage, UnknownMessage):
            cls.from_wire(value)


def test_refusals_name_the_field_and_the_rule() -> None:
    good = ShareRequest(request_id="ab", name="web", count=1).to_wire()
    with pytest.raises(MalformedMessage, match=r"^ShareRequest.count: 0 is not in 1\.\.1000$"):
        ShareRequest.from_wire({**good, "count": 0})
    with pytest.raises(MalformedMessage, match=r"ShareRequest.name: '../etc' is not a valid"):
        ShareRequest.from_wire({**good, "name": "../etc"})
    with pytest.raises(MalformedMessage, match="ShareRequest: no 'name'"):
        ShareRequest.from_wire({k: v for k, v in good.items() if k != "name"})
    with pytest.raises(MalformedMessage, match=r"packages\[0\]: 'Bad Pkg' is not a valid"):
        ShareRequest.from_wire({**good, "packages": ["Bad Pkg"]})
    with pytest.raises(UnknownMessage, match="version 2"):
        ShareRequest.from_wire({**good, "v": 2})
    with pytest.raises(MalformedMessage, match="True is not an integer"):
        ShareRequest.from_wire({**good, "count": True})


def test_checked_turns_the_peer_error_into_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"RequestVms.count: 0 is not in 1..1000"):
        RequestVms(name="web", count=0).checked()
    with pytest.raises(UsageError, match="package name"):
        RequestVms(name="web", count=1, packages=frozenset({"../x"})).checked()


def test_a_custom_zip_is_checked_where_it_enters() -> None:
    """A peer's unsafe zip is the peer's fault (``from_wire``); the user's is refused by
    the CLI's ``.checked()`` with the same words, before anything is placed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../etc/passwd", b"x")
    bad = ShareRequest(request_id="ab", name="web", count=1, custom_zip=buf.getvalue())
    with pytest.raises(MalformedMessage, match=r"ShareRequest\.custom_zip: .*unsafe member name"):
        ShareRequest.from_wire(bad.to_wire())
    with pytest.raises(UsageError, match=r"RequestVms\.custom_zip: custom zip is not a zip"):
        RequestVms(name="web", count=1, custom_zip=b"PK nonsense").checked()


def test_a_checked_zip_carries_its_entries_past_the_edge() -> None:
    """The entries the check listed travel with the zip; nothing checks it again, and a
    zip that skipped its edge is a bug, not something to check late."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tool/run.sh", b"echo hi\n")
    body = RequestVms(name="web", count=1, custom_zip=buf.getvalue()).checked()
    assert isinstance(body.custom_zip, CheckedZip)
    assert [e.path for e in body.custom_zip.entries] == ["tool/run.sh"]
    assert body.checked().custom_zip is body.custom_zip, "checked once"
    share = ShareRequest.from_wire(
        ShareRequest(request_id="ab", name="web", count=1, custom_zip=buf.getvalue()).to_wire()
    )
    assert share.custom_zip is not None
    assert checked_zip(share.custom_zip).entries == body.custom_zip.entries
    with pytest.raises(InternalError):
        checked_zip(buf.getvalue())


def test_an_old_peers_share_reply_still_decodes() -> None:
    """Fields added to a body have defaults, so a peer that does not send them is read."""
    old = {"v": ShareReply.VERSION, "host": "h2", "granted": 1}
    reply = ShareReply.from_wire(old)
    assert reply.unplaced == 0 and reply.template_seconds == {}


def test_unknown_keys_are_ignored_for_newer_peers() -> None:
    cap = Capacity(2, 1024, 100, 100, 1, 1)
    assert Capacity.from_wire({**cap.to_wire(), "gpus": 4}) == cap


def test_cross_field_rules_hold() -> None:
    ok = TemplateInfo("a" * 32, "b" * 64, frozenset({"x"}), ("c" * 64,), (10,)).to_wire()
    with pytest.raises(MalformedMessage, match="differ in length"):
        TemplateInfo.from_wire({**ok, "delta_sizes": []})


def test_a_field_without_a_spec_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Loose(Message):
        n: int = 0

    with pytest.raises(TypeError, match="not declared with wire"):
        Loose.from_wire({"v": 1})


def test_every_error_class_travels_as_itself() -> None:
    for code in ErrorCode:
        exc = from_code(code.value, "why")
        assert str(exc) == "why"
        assert type(exc).code is code and error_code(exc) is code, code
    assert isinstance(from_code("package_install", "x"), PackageInstallError)
    assert isinstance(from_code("internal", "x"), InternalError)
    unknown = from_code("from_the_future", "new")
    assert isinstance(unknown, RemoteError) and unknown.remote_code == "from_the_future"


def test_an_error_never_has_an_empty_reason() -> None:
    assert str(VmmeshError()) == "VmmeshError"
    assert str(MalformedMessage("")) == "MalformedMessage"


def test_specs_have_strategies() -> None:
    @dataclass(frozen=True)
    class Small(Message):
        word: str = wire(Text(5, "[a-z]+", "word"))
        n: int = wire(Int(0, 3), default=0)

    assert Small.from_wire({"v": 1, "word": "abc"}) == Small("abc")
    assert Empty.from_wire({"v": 1}) == Empty()
    assert codec.Spec[int]().dump(1) == 1
