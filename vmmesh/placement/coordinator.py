"""The mesh request coordinator as a state machine: which hosts to ask, and the report.

Theory of operation
-------------------
Any node may coordinate ``vmmesh request NAME COUNT PKG...``.  This class is
its decision part, without I/O (like the gossip core and h11): it is fed the
gossiped view and what each asked host answered, and it says whom to ask
next.  The trio glue (``vmmesh.vmservice.requests``) only calls hosts, in
parallel, and feeds their answers back.

A request runs in *waves*.  ``start`` plans over the view and returns the
first wave: one ``Ask`` per chosen host, each numbering its VMs from a
distinct ``first_index`` so names stay unique across hosts.  Each answer is
fed with one of

* ``made``: the host admitted ``granted`` VMs (maybe fewer than asked:
  gossip was stale, admission happens at the owner) and made ``vms`` of them;
* ``failed``: the host failed or is gone: its whole share is re-placed and
  it is not asked again for this request;
* ``cannot_install``: the host's package manager does not know a package.

When every ask of a wave is answered, ``next_wave`` re-plans what was not
made (``planner.replan``: a host that made fewer VMs than asked keeps what it
made and gets no more) and returns the next asks, or none when the request
is done, nothing more can be placed, or ``max_rounds`` waves were tried.
A package unknown to every host that tried, with nothing made, ends the
request with ``PackageInstallError`` (the same package source serves every
host, so asking more hosts would only repeat the error); if some host made
VMs, the others' shares are re-placed instead.

``report`` gives the request's answer as the CLI reads it
(``api.vm.RequestReport``: the hosts' own ``VmMade`` records, what was not
placed and why, notes on every host that failed or admitted less than asked,
the first plan); the glue adds only the request id and the time it took.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vmmesh.api.vm import PlannedShare, RequestReport, Unplaced, VmMade
from vmmesh.errors import InternalError, PackageInstallError
from vmmesh.gossip.hoststate import HostView
from vmmesh.placement.planner import HostIndex, PlacementRequest, Plan, plan, replan

MAX_ROUNDS = 8


def placement_seed(name: str, count: int, packages: Iterable[str]) -> str:
    """The id that breaks ties between equal hosts: derived from the request itself,
    so a dry run and the real request over the same view make the same plan."""
    text = "\0".join([name, str(count), *sorted(packages)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Ask:
    """Ask host ``node_id`` for ``count`` VMs numbered from ``first_index``."""

    node_id: str
    host: str
    count: int
    first_index: int


def planned_shares(p: Plan) -> tuple[PlannedShare, ...]:
    """A plan as the request's answer shows it."""
    return tuple(
        PlannedShare(
            node_id=s.node_id,
            host=s.host,
            count=s.count,
            match=s.match.name.lower(),
            template=s.template_id,
            missing=s.missing,
            reason=s.reason,
        )
        for s in p.shares
    )


def dry_run(request: PlacementRequest, view: Sequence[HostView] | HostIndex) -> RequestReport:
    """What ``start`` would do, as a report with nothing made."""
    p = plan(request, view)
    unplaced = (Unplaced(p.unplaced, p.unplaced_reason),) if p.unplaced else ()
    return RequestReport(
        name=request.name,
        requested=request.count,
        dry_run=True,
        plan=planned_shares(p),
        unplaced=unplaced,
    )


@dataclass
class Coordinator:
    """One mesh request from plan to report (see the module docstring)."""

    request: PlacementRequest
    first_index: int = 1
    max_rounds: int = MAX_ROUNDS
    _plan: Plan | None = field(default=None, init=False)
    _first_plan: Plan | None = field(default=None, init=False)
    _next: int = field(default=0, init=False)
    _round: int = field(default=0, init=False)
    _asked: dict[str, int] = field(default_factory=dict, init=False)
    _made_by: dict[str, int] = field(default_factory=dict, init=False)
    _open: set[Ask] = field(default_factory=set, init=False)
    _failed: set[str] = field(default_factory=set, init=False)
    _no_package: list[tuple[Ask, str]] = field(default_factory=list, init=False)
    _vms: list[VmMade] = field(default_factory=list, init=False)
    _errors: list[str] = field(default_factory=list, init=False)
    _notes: list[str] = field(default_factory=list, init=False)

    # --- driving ------------------------------------------------------------

    def start(self, view: Sequence[HostView] | HostIndex) -> list[Ask]:
        """Plan over ``view``; the first wave of asks."""
        if self._plan is not None:
            raise InternalError("the coordinator has already started")
        self._plan = self._first_plan = plan(self.request, view)
        self._next = self.first_index
        return self._wave()

    def made(
        self, ask: Ask, granted: int, vms: Sequence[VmMade], errors: Sequence[str] = ()
    ) -> None:
        """``ask``'s host admitted ``granted`` VMs and made ``vms``."""
        self._answered(ask)
        self._made_by[ask.node_id] = self._made_by.get(ask.node_id, 0) + len(vms)
        self._vms.extend(vms)
        self._errors.extend(f"{ask.host}: {e}" for e in errors)
        if granted < ask.count:
            self._notes.append(
                f"host {ask.host} admitted {granted} of {ask.count}; the rest was re-placed"
            )

    def failed(self, ask: Ask, reason: str) -> None:
        """``ask``'s host failed (or went down): its share goes elsewhere."""
        self._answered(ask)
        self._failed.add(ask.node_id)
        self._notes.append(f"host {ask.host} failed ({reason}); its share was re-placed")

    def cannot_install(self, ask: Ask, reason: str) -> None:
        """``ask``'s host's package source does not have a requested package."""
        self._answered(ask)
        self._no_package.append((ask, reason))

    def next_wave(self, view: Sequence[HostView] | HostIndex) -> list[Ask]:
        """Re-plan after a wave; the next asks (none: done).

        Raises PackageInstallError when hosts could not install a package and
        nothing was made at all.
        """
        if self._open:
            raise InternalError("the wave is not answered yet")
        if self._no_package and not self._vms:
            raise PackageInstallError(self._no_package[0][1])
        for ask, reason in self._no_package:
            self._failed.add(ask.node_id)
            self._notes.append(f"host {ask.host} cannot install: {reason}; its share was re-placed")
        self._no_package.clear()
        if self._round >= self.max_rounds or len(self._vms) >= self.request.count:
            return []
        refused = {
            nid: self._made_by.get(nid, 0)
            for nid, asked in self._asked.items()
            if self._made_by.get(nid, 0) < asked and nid not in self._failed
        }
        assert self._plan is not None
        self._plan = replan(self._plan, self._failed, refused, view)
        self._asked.update(refused)
        return self._wave()

    # --- results ------------------------------------------------------------

    @property
    def done(self) -> bool:
        return not self._open

    def report(self) -> RequestReport:
        assert self._plan is not None and self._first_plan is not None
        unplaced: tuple[Unplaced, ...] = ()
        missing = self.request.count - len(self._vms)
        if missing > 0:
            reason = self._plan.unplaced_reason or "no host could take them"
            unplaced = (Unplaced(missing, reason),)
        return RequestReport(
            name=self.request.name,
            requested=self.request.count,
            placed=len(self._vms),
            vms=tuple(self._vms),
            unplaced=unplaced,
            errors=tuple(self._errors),
            notes=tuple(self._notes),
            plan=planned_shares(self._first_plan),
        )

    # --- internals ----------------------------------------------------------

    def _answered(self, ask: Ask) -> None:
        if ask not in self._open:
            raise InternalError(f"no open ask {ask}")
        self._open.discard(ask)

    def _wave(self) -> list[Ask]:
        assert self._plan is not None
        self._round += 1
        wave: list[Ask] = []
        for share in self._plan.shares:
            extra = share.count - self._asked.get(share.node_id, 0)
            if extra > 0 and share.node_id not in self._failed:
                wave.append(Ask(share.node_id, share.host, extra, self._next))
                self._next += extra
                self._asked[share.node_id] = self._asked.get(share.node_id, 0) + extra
        self._open.update(wave)
        return wave
