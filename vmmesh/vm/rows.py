"""The ``vms`` table: one row per VM of this host, read as ``VmRecord``.

Every write of a VM's state goes through ``VmRows.apply``, which reads the
row's state, asks ``state.transition`` and writes the outcome (or deletes the
row) in one transaction, with no ``await`` between: two tasks never both act
on a state one of them has already moved.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmmesh.api.names import request_name_of
from vmmesh.api.vm import PLAIN, Lineage
from vmmesh.errors import InternalError, NotFound
from vmmesh.host.sshkeys import pick_port
from vmmesh.host.store import Store
from vmmesh.vm.state import ACTIVE, GONE, VmEvent, VmState, ends, transition

SPARES_DIR = "spares"  # beside vms/: warm spares' disks (``vm.spare``)


@dataclass(frozen=True)
class VmRecord:
    """One row of the ``vms`` table."""

    vm_id: str
    name: str
    template_id: str | None
    state: VmState
    disk: str
    vcpus: int
    memory_mb: int
    pid: int
    created: float
    started: float
    stopped: float
    stop_reason: str
    request_id: str
    ssh_port: int = 0  # host port forwarded to the guest's port 22; 0: none
    start_kind: str = "cold"  # cold: booted; warm: resumed from a saved boot
    start_seconds: float = 0.0
    lineage: Lineage = PLAIN

    @property
    def request_name(self) -> str:
        return request_name_of(self.name)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> VmRecord:
        return cls(
            vm_id=row["vm_id"],
            name=row["name"],
            template_id=row["template_id"],
            state=VmState(row["state"]),
            disk=row["disk"],
            vcpus=int(row["vcpus"]),
            memory_mb=int(row["memory_mb"]),
            pid=int(row["pid"]),
            created=float(row["created"]),
            started=float(row["started"]),
            stopped=float(row["stopped"]),
            stop_reason=row["stop_reason"],
            request_id=row["request_id"],
            ssh_port=int(row["ssh_port"]),
            start_kind=row["start_kind"],
            start_seconds=float(row["start_seconds"]),
            lineage=Lineage(
                keep_alive=bool(row["keep_alive"]),
                generation=int(row["generation"]),
                origin=row["origin"],
            ),
        )


@dataclass(frozen=True)
class NewVm:
    """What a ``creating`` row records."""

    vm_id: str
    display: str
    template_id: str | None
    disk: Path
    vcpus: int
    memory_mb: int
    request_id: str
    lineage: Lineage = PLAIN


def _can_bind(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address or "0.0.0.0", port))
        except OSError:
            return False
    return True


class VmRows:
    """The ``vms`` table and the files named after its rows (overlay, run directory)."""

    def __init__(
        self,
        store: Store,
        vm_dir: Path,
        run_root: Path,
        *,
        now: Callable[[], float],
        ssh_ports: range,
        ssh_bind: str,
    ) -> None:
        self.store = store
        self.vm_dir = vm_dir
        self.run_root = run_root
        self.now = now
        self.ssh_ports = ssh_ports
        self.ssh_bind = ssh_bind

    def list(self) -> list[VmRecord]:
        rows = self.store.conn.execute("SELECT * FROM vms ORDER BY created, name").fetchall()
        return [VmRecord.from_row(r) for r in rows]

    def get(self, name_or_id: str) -> VmRecord:
        row = self.store.conn.execute(
            "SELECT * FROM vms WHERE vm_id = ? OR name = ? ORDER BY created DESC",
            (name_or_id, name_or_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no VM {name_or_id!r:.80} on this host")
        return VmRecord.from_row(row)

    def state_of(self, vm_id: str) -> VmState | None:
        """The row's state; None when there is no row."""
        row = self.store.conn.execute("SELECT state FROM vms WHERE vm_id = ?", (vm_id,)).fetchone()
        return None if row is None else VmState(row["state"])

    def active(self) -> tuple[int, int, int]:
        """(vCPUs, MB of memory, VMs) held by VMs in an ``ACTIVE`` state."""
        vcpus, memory, count = self.store.conn.execute(
            "SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mb), 0), COUNT(*)"
            f" FROM vms WHERE state IN ({','.join('?' * len(ACTIVE))})",
            ACTIVE,
        ).fetchone()
        return int(vcpus), int(memory), int(count)

    def insert(self, vm: NewVm, state: VmState = VmState.CREATING) -> int:
        """The row of a VM being made (``creating``) or arriving from another host
        (``incoming``), with its ssh port; returns the port (0: none)."""
        if state not in (VmState.CREATING, VmState.INCOMING):
            raise InternalError(f"a VM's row is not born {state}")
        with self.store.transaction() as conn:
            # chosen and recorded with no await between: two VMs never share a port
            ssh_port = self._free_ssh_port(conn)
            conn.execute(
                "INSERT INTO vms (vm_id, name, template_id, state, disk, vcpus, memory_mb,"
                " created, request_id, ssh_port, keep_alive, generation, origin)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    vm.vm_id,
                    vm.display,
                    vm.template_id,
                    state.value,
                    vm.disk.name,
                    vm.vcpus,
                    vm.memory_mb,
                    self.now(),
                    vm.request_id,
                    ssh_port,
                    int(vm.lineage.keep_alive),
                    vm.lineage.generation,
                    vm.lineage.origin,
                ),
            )
        return ssh_port

    def _free_ssh_port(self, conn: sqlite3.Connection) -> int:
        """A forward port no VM of this host holds and nothing else listens on; 0: none."""
        if not self.ssh_ports:
            return 0
        used = [int(r[0]) for r in conn.execute("SELECT ssh_port FROM vms WHERE ssh_port != 0")]
        return pick_port(self.ssh_ports, used, lambda port: _can_bind(self.ssh_bind, port))

    def apply(self, vm_id: str, event: VmEvent, **fields: Any) -> VmState | None:
        """Move the row of ``vm_id`` by ``event`` (``fields``: columns set with the state).

        Returns the new state; None when the row is gone now (deleted by this
        event, with the VM's overlay and run directory, or there was no row:
        nothing to move).  ``InternalError`` for an event its state does not take.
        """
        with self.store.transaction() as conn:
            row = conn.execute("SELECT state FROM vms WHERE vm_id = ?", (vm_id,)).fetchone()
            if row is None:
                if ends(event):  # files a half-made VM wrote after its row went
                    self.delete_files(vm_id)
                return None
            new = transition(VmState(row["state"]), event)
            if new is GONE:
                # files first: a crash in between leaves a row whose disk is missing
                self.delete_files(vm_id)
                conn.execute("DELETE FROM vms WHERE vm_id = ?", (vm_id,))
                return None
            sets = ", ".join(f"{column} = ?" for column in ("state", *fields))
            conn.execute(
                f"UPDATE vms SET {sets} WHERE vm_id = ?", (new.value, *fields.values(), vm_id)
            )
        return new

    def layer_path(self, vm_id: str) -> Path:
        """Where a VM that arrived from another host keeps the layer its overlay sits
        on, when that was the sender's own (a warm state's disk), not a template."""
        return self.vm_dir / f"{vm_id}.layer.qcow2"

    def delete_files(self, vm_id: str) -> None:
        """The VM's overlay, its own layer (if it came with one) and run directory, and
        the first name of its overlay if it was a warm spare (``vm.spare``)."""
        (self.vm_dir / f"{vm_id}.qcow2").unlink(missing_ok=True)
        (self.vm_dir.parent / SPARES_DIR / f"{vm_id}.qcow2").unlink(missing_ok=True)
        self.layer_path(vm_id).unlink(missing_ok=True)
        shutil.rmtree(self.run_root / vm_id, ignore_errors=True)
