"""The error rule of ``vmmesh/`` and ``cli/``, checked from the source: a meaning
travels as a type or an error code, never as words in a message.

``"revoked" in str(exc)`` works until someone rewords the message; then it is
silently false.  So no code may decide by an exception's text: no ``in`` /
``not in`` against ``str(x)``, ``x.args...`` or ``x.message``, no
``str(x).startswith(...)`` / ``endswith(...)``, no ``str(x) == "..."``, no
``re.search(..., str(x))``.  Catch a precise class instead, or compare a
number the exception carries (``QemuImgFailed.returncode``).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("vmmesh", "cli")
_TEXT_TESTS = {"startswith", "endswith"}
_RE_CALLS = {"search", "match", "fullmatch", "findall", "finditer"}


def _message_of(node: ast.expr) -> str | None:
    """``str(NAME)``, ``NAME.args...`` or ``NAME.message`` (the text of an exception), else None."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "str"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Name)
    ):
        return ast.unparse(node)
    root = node
    while isinstance(root, ast.Subscript | ast.Attribute):
        if (
            isinstance(root, ast.Attribute)
            and root.attr in ("args", "message")
            and isinstance(root.value, ast.Name)
        ):
            return ast.unparse(node)
        root = root.value
    return None


def _is_text(node: ast.expr) -> bool:
    """Words to compare with (not ``""``: an empty message is no meaning)."""
    return isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value != ""
    )


def _violation(node: ast.AST) -> str | None:
    """What ``node`` matches a message with, or None."""
    if isinstance(node, ast.Compare):
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            if isinstance(op, ast.In | ast.NotIn) and (text := _message_of(right)):
                return f"`in` on {text}"
            if isinstance(op, ast.Eq | ast.NotEq):
                for a, b in ((left, right), (right, left)):
                    if (text := _message_of(a)) and _is_text(b):
                        return f"`==` on {text}"
            left = right
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        func = node.func
        if func.attr in _TEXT_TESTS and (text := _message_of(func.value)):
            return f"{func.attr} on {text}"
        if (
            func.attr in _RE_CALLS
            and isinstance(func.value, ast.Name)
            and func.value.id == "re"
            and any(_message_of(a) for a in node.args)
        ):
            return f"re.{func.attr} on an exception's text"
    return None


def message_matches(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for each place ``source`` decides by an exception's text."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        what = _violation(node)
        if what is not None:
            found.append((getattr(node, "lineno", 0), what))
    return [f"{filename}:{line}: {what}" for line, what in sorted(found)]


def test_no_code_decides_by_an_exceptions_message() -> None:
    found: list[str] = []
    files = 0
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            files += 1
            found += message_matches(path.read_text(), str(path.relative_to(REPO)))
    assert files > 50, "the check found the sources"
    assert not found, "match a type or an error code, not words:\n" + "\n".join(found)


def test_the_check_finds_a_planted_match() -> None:
    planted = """
def broken(exc: Exception) -> bool:
    try:
        pass
    except OSError as exc:
        if "x" in str(exc):
            return True
    if "y" not in exc.args[0]:
        return False
    if str(exc).startswith("peer"):
        return True
    return str(exc) == "gone" or exc.message == f"no {exc}"
"""
    found = message_matches(planted, "planted.py")
    assert found == [
        "planted.py:6: `in` on str(exc)",
        "planted.py:8: `in` on exc.args[0]",
        "planted.py:10: startswith on str(exc)",
        "planted.py:12: `==` on exc.message",
        "planted.py:12: `==` on str(exc)",
    ]


def test_the_check_passes_code_that_matches_types() -> None:
    clean = """
import errno


def fine(exc: OSError, name: str, names: list[str]) -> bool:
    try:
        pass
    except FileNotFoundError:
        return False
    if exc.errno == errno.ENOENT or name in names or "x" in name:
        return True
    return str(exc) != "" and len(str(exc)) > 3 and f"{exc}".count("a") > 0
"""
    assert message_matches(clean, "clean.py") == []
