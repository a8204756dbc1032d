"""The local sqlite state, versioned like magic-wormhole's mailbox server.

Theory of operation: the schema lives in ``schema/NNN_*.sql`` files.  A new
database is written to a temporary file and renamed into place, so a crash
never leaves a half-created database.  An existing database is upgraded one
version at a time inside a transaction.  Every state change elsewhere in the
node goes through ``Store.transaction()`` so it is all-or-nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from vmmesh.errors import StateError

_SCHEMA_FILE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def _schema_scripts() -> dict[int, str]:
    scripts: dict[int, str] = {}
    for entry in resources.files("vmmesh.host.schema").iterdir():
        m = _SCHEMA_FILE.match(entry.name)
        if m:
            scripts[int(m.group(1))] = entry.read_text()
    return scripts


def latest_version() -> int:
    return max(_schema_scripts())


class Store:
    """A connection to the node's sqlite file."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path) -> Store:
        path = Path(path)
        if not path.exists():
            _create(path)
        conn = _connect(path)
        store = cls(conn, path)
        try:
            store._upgrade()
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        self.conn.close()

    def version(self) -> int:
        row = self.conn.execute("SELECT version FROM version").fetchone()
        if row is None:
            raise StateError(f"{self.path}: no schema version")
        return int(row[0])

    def _upgrade(self) -> None:
        scripts = _schema_scripts()
        current = self.version()
        for v in range(current + 1, max(scripts) + 1):
            upgrade = scripts.get(v)
            if upgrade is None:
                raise StateError(f"no upgrade script to schema version {v}")
            try:
                with self.transaction() as conn:
                    # executescript would COMMIT first: run the statements one by
                    # one, inside this transaction, so a failed upgrade changes nothing
                    for statement in _statements(upgrade):
                        conn.execute(statement)
                    conn.execute("UPDATE version SET version = ?", (v,))
            except sqlite3.Error as exc:
                raise StateError(
                    f"cannot upgrade {self.path} to schema version {v}: {exc}"
                ) from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StateError(f"cannot write {self.path}: {exc}") from exc
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # --- meta: small typed facts --------------------------------------

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )


def _statements(script: str) -> list[str]:
    """The SQL statements of a schema script, in order (comments and blanks dropped)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        raise StateError(f"schema script ends inside a statement: {pending[:80]!r}")
    return out


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    except sqlite3.Error as exc:
        raise StateError(f"cannot open {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _create(path: Path) -> None:
    """Write schema version 1 to a temp file, then rename it into place."""
    scripts = _schema_scripts()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.executescript(scripts[1])
    finally:
        conn.close()
    os.replace(tmp, path)
