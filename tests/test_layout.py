"""The house rules of ``vmmesh/``, checked from the source: sub-packages with a theory
of operation, no import cycles, short functions, typed handlers."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "vmmesh"
MAX_FUNCTION_LINES = 80


def _modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
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
    for init in ROOT.rglob("__init__.py"):
        if init.parent.name == "schema":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 20, f"{init.parent.name}/ has no theory of operation"


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
