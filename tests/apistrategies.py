"""Hypothesis strategies for every typed body, derived from the field specs themselves."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import math
import zipfile
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from vmmesh.api import codec
from vmmesh.api.codec import Record
from vmmesh.api.customzip import CustomZip

API_MODULES = ("common", "host", "node", "vm", "join", "transfer", "jobs")

# Any plain value msgpack carries: what a hostile peer may put in any field.
ANY_VALUE: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def body_classes() -> list[type[Record]]:
    """Every Record and Message defined in the api package."""
    out: list[type[Record]] = []
    for name in API_MODULES:
        try:
            module = importlib.import_module(f"vmmesh.api.{name}")
        except ImportError:
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, Record)
                and cls not in (Record, codec.Message)
                and cls.__module__ == module.__name__
                and dataclasses.is_dataclass(cls)
            ):
                out.append(cls)
    return out


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


_ZIPS = [_zip({}), _zip({"tool/run.sh": b"echo hi\n"}), _zip({"a": b"", "d/b": b"x" * 100})]


def for_spec(spec: codec.Spec[Any]) -> st.SearchStrategy[Any]:
    if isinstance(spec, codec.Int):
        return st.integers(spec.lo, spec.hi)
    if isinstance(spec, codec.Float):
        hi = spec.hi if math.isfinite(spec.hi) else 1e12
        lo = spec.lo if math.isfinite(spec.lo) else -1e12
        return st.floats(lo, hi, allow_nan=False)
    if isinstance(spec, codec.Bool):
        return st.booleans()
    if isinstance(spec, codec.Text):
        if spec.pattern is not None:
            return st.from_regex(spec.pattern, fullmatch=True).filter(
                lambda s: len(s) <= spec.max_len
            )
        return st.text(max_size=min(spec.max_len, 40))
    if isinstance(spec, CustomZip):  # random bytes are no zip: from_wire refuses them
        return st.sampled_from(_ZIPS)
    if isinstance(spec, codec.Bytes):
        return st.binary(min_size=spec.min_len, max_size=max(spec.min_len, min(spec.max_len, 64)))
    if isinstance(spec, codec.Choice):
        return st.sampled_from(list(spec.cls.__members__.values()))
    if isinstance(spec, codec.Optional):
        return st.none() | for_spec(spec.inner)
    if isinstance(spec, codec.ListOf):
        return st.lists(for_spec(spec.inner), max_size=min(spec.max_items, 3)).map(tuple)
    if isinstance(spec, codec.SetOf):
        return st.frozensets(for_spec(spec.inner), max_size=min(spec.max_items, 3))
    if isinstance(spec, codec.MapOf):
        return st.dictionaries(
            for_spec(spec.key), for_spec(spec.value), max_size=min(spec.max_items, 3)
        )
    if isinstance(spec, codec.Nested):
        return body(spec.cls)
    raise TypeError(f"no strategy for {spec!r}")


@st.composite
def _build(draw: st.DrawFn, cls: type[Record]) -> Record:
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kwargs[f.name] = draw(for_spec(f.metadata["spec"]))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError):
        assume(False)  # a cross-field rule (``__post_init__``) says no
        raise


@st.composite
def _blob_info(draw: st.DrawFn) -> Any:
    from vmmesh.api.transfer import BlobInfo

    piece_size = draw(st.sampled_from([64 << 10, 4 << 20]))
    count = draw(st.integers(0, 5))
    size = 0 if not count else draw(st.integers((count - 1) * piece_size + 1, count * piece_size))
    sha = st.from_regex("[0-9a-f]{64}", fullmatch=True)
    return BlobInfo(
        sha256=draw(sha),
        size=size,
        piece_size=piece_size,
        pieces=tuple(draw(sha) for _ in range(count)),
        zero=frozenset(draw(st.sets(st.integers(0, count - 1)))) if count else frozenset(),
    )


# Bodies whose fields constrain each other more than specs can say.
SPECIAL: dict[str, Any] = {"BlobInfo": _blob_info}


def body(cls: type[Any]) -> st.SearchStrategy[Any]:
    """A valid instance of ``cls``."""
    special = SPECIAL.get(cls.__name__)
    return special() if special is not None else _build(cls)
