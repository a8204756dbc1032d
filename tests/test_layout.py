"""The house rules of ``vmmesh/``, checked from the source: sub-packages with a theory
of operation that keep to their import rule, no import cycles, short functions, typed
handlers.

The import rule
---------------
Each sub-package's ``__init__.py`` docstring holds exactly one paragraph (up to the
next blank line; it may wrap) of the form::

    May import: vmmesh.api, vmmesh.host.store, vmmesh.net (from driver, join).

``May import:``, then entries separated by commas, then an optional full stop.  An
entry is a module or package of ``vmmesh`` by its full dotted name; it allows that
module and everything under it.  ``(from a, b)`` after an entry allows it only in the
named modules of this sub-package (``driver`` is ``vmmesh.gossip.driver``).  An entry
that names nothing that exists fails the test (a rule must not rot into a typo).

A module of a sub-package may import, at run time:

* its own sub-package, always;
* ``ALWAYS_ALLOWED``: ``vmmesh.errors`` (the one exception root every layer raises
  from) and ``vmmesh.nurseries`` (a trio helper); both import no sub-package, so
  they cannot carry a layer in through the back door;
* what its line names.  The other top-level modules import sub-packages themselves
  (``config``: ``errors`` only, but it is the node's settings; ``extension``: the
  node's interface to its features; ``progress``: ``api``), so a sub-package that
  uses one lists it; ``node`` and ``lab`` sit above everything and no line names
  them.

Importing a package on the way to an allowed module (``from vmmesh.mesh import pki``
runs ``vmmesh/mesh/__init__.py``) is allowed.  Only run-time imports count
(``_imports`` skips ``if TYPE_CHECKING:`` blocks): an annotation is no load-time
dependency, and ``transfer``/``jobs`` name the VM service they serve only there.
Imports inside functions count.  The rule is direct, not transitive: what an
allowed module imports is that package's own line's business.  The README's design
table repeats each line in short names, and a test keeps the two equal.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "vmmesh"
MAX_FUNCTION_LINES = 80
ALWAYS_ALLOWED = ("vmmesh.errors", "vmmesh.nurseries")
MIN_THEORY_WORDS = 120  # the May import line not counted


def _modules(root: Path = ROOT) -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text(), str(path))


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines of code: not blank, not comments, not the docstring."""
    first, last = node.lineno, node.end_lineno or node.lineno
    skip: set[int] = set()
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        doc = body[0]
        skip = set(range(doc.lineno, (doc.end_lineno or doc.lineno) + 1))
    count = 0
    for i in range(first, last + 1):
        text = source[i - 1].strip()
        if i in skip or not text or text.startswith("#"):
            continue
        count += 1
    return count


def test_every_subpackage_has_a_theory_of_operation() -> None:
    """What happens in it, in what order, what can fail and who is told: a list of
    module names with "Owns:" in front does not reach the floor."""
    for init in ROOT.rglob("__init__.py"):
        if init.parent.name == "schema" or init.parent == ROOT:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        prose = [p for p in re.split(r"\n\s*\n", doc) if not p.startswith("May import:")]
        words = len(" ".join(prose).split())
        assert words >= MIN_THEORY_WORDS, f"{init.parent.name}/ has no theory of operation"
        assert "Owns:" not in doc, f"{init.parent.name}/ lists instead of telling"
        assert "fail" in doc.lower(), f"{init.parent.name}/ says nothing of what can fail"


def test_no_function_over_80_lines() -> None:
    long = []
    for name, path, tree in _modules():
        source = path.read_text().splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = _code_lines(node, source)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def _imports(name: str, tree: ast.Module) -> set[str]:
    """What a module imports at run time (``if TYPE_CHECKING:`` blocks do not count)."""
    out: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("vmmesh"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("vmmesh")
        ):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@dataclass(frozen=True)
class _Allowed:
    target: str  # a module or package: it and everything under it
    only_in: frozenset[str]  # modules of the importing sub-package; empty: all of them


_ENTRY = re.compile(r"(?P<target>vmmesh(?:\.\w+)+)(?: \(from (?P<only>\w+(?:, \w+)*)\))?")


def _may_import(doc: str) -> list[_Allowed]:
    """The entries of a docstring's "May import:" paragraph; ValueError if unreadable."""
    paras = [p for p in re.split(r"\n\s*\n", doc) if p.startswith("May import:")]
    if len(paras) != 1:
        raise ValueError(f"{len(paras)} 'May import:' paragraphs, not one")
    text = " ".join(paras[0].split()).removeprefix("May import:").strip().removesuffix(".")
    out = []
    for entry in re.split(r",\s*(?![^()]*\))", text):
        m = _ENTRY.fullmatch(entry.strip())
        if m is None:
            raise ValueError(f"cannot read the entry {entry.strip()!r}")
        only = frozenset(m["only"].split(", ")) if m["only"] else frozenset()
        out.append(_Allowed(m["target"], only))
    return out


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _may(name: str, package: str, module: str, rule: list[_Allowed]) -> bool:
    if _under(name, package) or any(_under(name, a) for a in ALWAYS_ALLOWED):
        return True
    for allowed in rule:
        if allowed.only_in and module not in allowed.only_in:
            continue
        if _under(name, allowed.target) or _under(allowed.target, name):
            return True  # the module itself, or a package on the way to it
    return False


def import_rule_violations(root: Path = ROOT) -> list[str]:
    """Every run-time import of a sub-package's module that its "May import:" line does
    not allow, as "module imports name", and every line that cannot be read."""
    modules = {name: tree for name, _, tree in _modules(root)}
    rules: dict[str, list[_Allowed]] = {}
    bad = []
    for init in sorted(root.glob("*/__init__.py")):
        package = f"{root.name}.{init.parent.name}"
        try:
            rules[package] = _may_import(ast.get_docstring(modules[package]) or "")
        except ValueError as exc:
            bad.append(f"{package}: {exc}")
            continue
        for allowed in rules[package]:
            if allowed.target not in modules:
                bad.append(f"{package}: May import names {allowed.target}, which does not exist")
            bad.extend(
                f"{package}: May import names {package}.{m}, which does not exist"
                for m in sorted(allowed.only_in)
                if f"{package}.{m}" not in modules
            )
    for name, tree in modules.items():
        parts = name.split(".")
        package = ".".join(parts[:2])
        if package not in rules:
            continue  # vmmesh itself and its top-level modules
        module = parts[2] if len(parts) > 2 else ""
        refused = {i for i in _imports(name, tree) if not _may(i, package, module, rules[package])}
        # "from vmmesh.x import y" gives vmmesh.x and vmmesh.x.y: name the precise one
        bad.extend(
            f"{name} imports {i}"
            for i in sorted(refused)
            if not any(j.startswith(i + ".") for j in refused)
        )
    return bad


def test_every_subpackage_keeps_to_its_import_rule() -> None:
    assert import_rule_violations() == []


def test_the_readme_design_table_says_what_the_lines_say() -> None:
    """The README's "may import" column names what each line allows (short names,
    ``errors`` and ``nurseries`` left implicit), so the two cannot drift apart."""
    design = (ROOT.parent / "README.md").read_text().split("\n## Design\n", 1)[1]
    table = {}
    for line in design.split("\n## ", 1)[0].splitlines():
        m = re.match(r"\| `(\w+)/` \|.*\| ([^|]*) \|$", line)
        if m:
            table[m[1]] = set(re.findall(r"`([\w.]+)`", m[2])) - {"errors", "nurseries"}
    for init in sorted(ROOT.glob("*/__init__.py")):
        rule = _may_import(ast.get_docstring(ast.parse(init.read_text())) or "")
        said = {a.target.removeprefix("vmmesh.") for a in rule} - {
            a.removeprefix("vmmesh.") for a in ALWAYS_ALLOWED
        }
        said |= {m for a in rule for m in a.only_in}
        assert table.get(init.parent.name) == said, f"README's row for {init.parent.name}/"


def _plant(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "vmmesh" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "vmmesh"


_CLEAN = {
    "__init__.py": "",
    "errors.py": "class E(Exception): ...\n",
    "config.py": "",
    "low/__init__.py": '"""Low.\n\nMay import: vmmesh.errors."""\n',
    "low/a.py": "from vmmesh.errors import E\nfrom vmmesh.low import b\n",
    "low/b.py": "",
    "mid/__init__.py": '"""Mid.\n\nMay import: vmmesh.low."""\n',
    "mid/m.py": "import vmmesh.low.a\n",
    "high/__init__.py": (
        '"""High.\n\nMay import: vmmesh.low.a,\n    vmmesh.mid (from glue), vmmesh.config."""\n'
    ),
    "high/ok.py": """\
        from typing import TYPE_CHECKING

        from vmmesh import config
        from vmmesh.low import a

        if TYPE_CHECKING:
            from vmmesh.mid import m
        """,
    "high/glue.py": "from vmmesh.mid.m import X\n",
}


def test_the_import_rule_passes_a_clean_tree(tmp_path: Path) -> None:
    assert import_rule_violations(_plant(tmp_path, _CLEAN)) == []


@pytest.mark.parametrize(
    ("planted", "reported"),
    [
        # upwards, inside a function
        (
            {"low/c.py": "def f():\n    from vmmesh.high import ok\n"},
            "low.c imports vmmesh.high.ok",
        ),
        # a sibling module of an allowed one
        ({"high/d.py": "from vmmesh.low import b\n"}, "high.d imports vmmesh.low.b"),
        # allowed only from glue
        ({"high/e.py": "import vmmesh.mid.m\n"}, "high.e imports vmmesh.mid.m"),
        # a top-level module not on the line
        ({"low/f.py": "from vmmesh.config import C\n"}, "low.f imports vmmesh.config.C"),
        # a line with a typo, and a line that cannot be read
        (
            {"mid/__init__.py": '"""M.\n\nMay import: vmmesh.low, vmmesh.lwo."""'},
            "vmmesh.lwo, which does",
        ),
        ({"mid/__init__.py": '"""M.\n\nMay import: low."""'}, "cannot read the entry 'low'"),
    ],
)
def test_the_import_rule_reports_a_planted_import(
    tmp_path: Path, planted: dict[str, str], reported: str
) -> None:
    found = import_rule_violations(_plant(tmp_path, {**_CLEAN, **planted}))
    assert len(found) == 1, found
    assert reported in found[0]


def test_no_import_cycles() -> None:
    modules = {name: tree for name, _, tree in _modules()}
    graph = {
        name: {m for m in _imports(name, tree) if m in modules and m != name}
        for name, tree in modules.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_untyped_bodies_in_signatures() -> None:
    """Handlers (functions taking a call ``ctx``) take and return typed bodies, never
    ``dict[str, Any]``; only the raw envelope layer under them sees maps."""
    bad = []
    handlers = 0
    for name, _, tree in _modules():
        if name.startswith("vmmesh.wire") or name == "vmmesh.net.rpc":
            continue  # the raw envelope layer under the typed one
        for node in ast.walk(tree):
            params = (
                [a.arg for a in node.args.args] if isinstance(node, ast.AsyncFunctionDef) else []
            )
            if isinstance(node, ast.AsyncFunctionDef) and "ctx" in params:
                handlers += 1
                annotations = [a.annotation for a in node.args.args] + [node.returns]
                text = " ".join(ast.unparse(a) for a in annotations if a is not None)
                if "dict[str, Any]" in text or "Body" in text.split():
                    bad.append(f"{name}.{node.name}")
    assert handlers >= 15, "the check found the handlers"
    assert not bad, bad


def test_every_package_is_installed() -> None:
    """pyproject lists packages by hand (cli/ installs as vmmesh_cli): a new
    sub-package missing there works in a development checkout and breaks every
    real install."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    found = {".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob("__init__.py")}
    assert found - listed == set(), "add them to [tool.setuptools] packages"
