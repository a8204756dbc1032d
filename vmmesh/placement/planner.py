"""The placement planner: which hosts get how many VMs of a request.

Theory of operation
-------------------
Any node may accept ``vmmesh request NAME COUNT PKG...``.  It plans over its
gossiped view of the mesh (a list of ``HostView``) without I/O, then asks the
chosen hosts to create their share; what fails or is refused goes back through
``replan``.  Both functions are pure: same input, same plan, so a dry run shows
exactly what a real request would do and tests need no network.

Ranking follows the thesis (§3.1.1, figure 3.7): a host that already holds a
template with the requested software starts VMs fastest, so it is asked first.
Each host is scored by its *best* template under ``affinity`` (the same rule
``templates.py`` uses to choose the parent template on the host, so the plan
and the host agree).  Every host holds the mesh's base image, which counts as
an implicit template with no packages: a host without templates ranks in the
"none" class for a non-empty request, and for an empty request every host is
an exact match, so all hosts tie.

Order of hosts, best first:

1. match class: exact, superset, partial, none (see ``MatchClass``);
2. ``up`` before ``suspect`` within the same class — a suspect host may be
   dead, so it is asked only after the healthy hosts that are just as good
   (it is not demoted below a worse class: a suspect exact match still beats
   building from scratch elsewhere);
3. within the class: more packages in common, then fewer extra packages
   (smallest superset first);
4. a host holding a warm state of that template (``TemplateInfo.warm``)
   before one that would boot it cold: its VMs resume in about a second;
5. load spreading among equals: more free slots first, then fewer running
   VMs, then a stable hash (CRC-32, not Python's salted ``hash``) of
   (request id, node id) so that different requests spread over equal hosts
   differently while one request always gets the same plan, in any process;
   the node id settles the rare collisions.  The hash only breaks ties: it
   needs speed, not strength.

Hosts ``down``, draining, of unknown status or without a free slot are not
candidates.  Each candidate in order is filled up to its free slots
(``Capacity.free_slots``, the smaller of running and disk room) and the rest
spills to the next; what no host can take is reported as unplaced.

Cost: a ``HostIndex`` (built once per view) groups the usable hosts by the
distinct package sets they hold.  A request evaluates ``affinity`` once per
distinct set (a few hundred in a mesh), walks the sets best first, and stops
after the first match class whose hosts have room for the whole request: it
touches only the hosts that could matter.  1000 hosts x 200 templates plans
in well under 5 ms (``benchmarks/placement.py``).
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace

from vmmesh.api.host import TemplateInfo
from vmmesh.errors import InternalError
from vmmesh.gossip.hoststate import HostView

MAX_REQUEST_ID = 64


class MatchClass(enum.IntEnum):
    """How well a template (or host, by its best template) fits a request.

    Lower is better; the value is the first element of ``affinity``.
    """

    EXACT = 0  # holds exactly the requested packages: clone and boot
    SUPERSET = 1  # holds them all and more: clone and boot, carries extras
    PARTIAL = 2  # holds some: build a template with the missing ones first
    NONE = 3  # holds none: build from the base image


def affinity(template_pkgs: AbstractSet[str], wanted: AbstractSet[str]) -> tuple[int, int, int]:
    """Sort key of a template for a request: smaller is better.

    ``(match class, -packages in common, extra packages)``: exact before
    superset before partial before none; among supersets the smallest first;
    among partial matches the one with most in common, then the leanest.
    Shared with ``templates.py`` so that the planner and the host choosing a
    parent template follow one rule.  The base image is ``frozenset()``.
    """
    common = len(template_pkgs & wanted)
    extra = len(template_pkgs) - common
    if common == len(wanted):
        cls = MatchClass.EXACT if extra == 0 else MatchClass.SUPERSET
    else:
        cls = MatchClass.PARTIAL if common else MatchClass.NONE
    return (cls, -common, extra)


@dataclass(frozen=True)
class PlacementRequest:
    """What to place: ``count`` VMs called ``name`` with ``packages``.

    ``request_id`` seeds the tie-break between equal hosts; it must be the
    same for a plan and its replans.
    """

    request_id: str
    name: str
    count: int
    packages: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.request_id or len(self.request_id) > MAX_REQUEST_ID:
            raise InternalError(f"bad request id: {self.request_id!r:.80}")
        if self.count < 0:
            raise InternalError(f"cannot request a negative number of VMs: {self.count}")


@dataclass(frozen=True)
class Share:
    """``count`` VMs on one host, and why that host.

    ``template_id`` is the template the host is expected to clone, ``None``
    for the base image; ``missing`` the packages it must install first (empty
    for exact and superset matches).  ``room`` is the host's free slots when
    planned: ``replan`` may add up to ``room - count`` more there.
    """

    node_id: str
    host: str
    count: int
    match: MatchClass
    template_id: str | None
    missing: tuple[str, ...]
    room: int
    suspect: bool
    reason: str

    @property
    def builds(self) -> bool:
        """True when the host must build a template before cloning."""
        return bool(self.missing)


@dataclass(frozen=True)
class Plan:
    """Where the VMs of one request go, best host first.

    ``failed`` accumulates the hosts that failed over successive replans, so
    that none is ever asked again for this request.
    """

    request: PlacementRequest
    shares: tuple[Share, ...]
    unplaced: int
    unplaced_reason: str = ""
    failed: frozenset[str] = frozenset()

    @property
    def placed(self) -> int:
        return sum(s.count for s in self.shares)


class HostIndex:
    """A gossiped view digested for planning: build it once per view change.

    ``plan`` and ``replan`` accept a plain host list too and index it on the
    spot; a node that plans many requests over one view passes the index so
    the per-host work (which templates, which are usable) is done once and a
    request only pays for the hosts it actually looks at.

    Distinct package sets are numbered; set 0 is the base image, which every
    usable host holds.  ``holders[j]`` lists (usable host, template) for set
    ``j``; a host holding several templates with the same packages lists a warm one
    first, then the smallest template id, so the choice does not depend on
    gossip order.
    """

    __slots__ = ("_blocked", "_holders", "_pkgsets", "_skipped", "_tiebreak", "_usable")

    def __init__(self, hosts: Iterable[HostView]) -> None:
        seen: set[str] = set()
        usable: list[tuple[HostView, int, bytes]] = []
        skipped = {"down": 0, "draining": 0, "full": 0, "unable": 0}
        blocked: list[str] = []
        by_pkgs: dict[frozenset[str], dict[int, TemplateInfo]] = {}
        for h in hosts:
            if h.node_id in seen:
                raise InternalError(f"host {h.node_id} appears twice in the view")
            seen.add(h.node_id)
            free = h.capacity.free_slots
            if h.status not in ("up", "suspect"):
                skipped["down"] += 1
            elif h.draining:
                skipped["draining"] += 1
            elif free <= 0 and h.capacity.blocked:
                skipped["unable"] += 1
                blocked.append(f"{h.name}: {h.capacity.blocked}")
            elif free <= 0:
                skipped["full"] += 1
            else:
                i = len(usable)
                usable.append((h, free, h.node_id.encode()))
                for t in h.templates:
                    held = by_pkgs.get(t.packages)
                    if held is None:
                        by_pkgs[t.packages] = {i: t}
                    elif i not in held or _rank(t) < _rank(held[i]):
                        held[i] = t
        base: list[tuple[int, TemplateInfo | None]] = [(i, None) for i in range(len(usable))]
        self._usable = usable
        self._skipped = skipped
        self._blocked = tuple(sorted(blocked))
        self._pkgsets: list[frozenset[str]] = [frozenset(), *by_pkgs]
        self._tiebreak = [tuple(sorted(ps)) for ps in self._pkgsets]
        self._holders: list[Sequence[tuple[int, TemplateInfo | None]]] = [
            base,
            *(list(held.items()) for held in by_pkgs.values()),
        ]

    def fill(
        self,
        request: PlacementRequest,
        demand: int,
        exclude: AbstractSet[str] = frozenset(),
        limits: Mapping[str, int] | None = None,
    ) -> tuple[list[Share], dict[str, int]]:
        """Rank the usable hosts for ``request`` and fill them with ``demand`` VMs.

        Package sets are walked best ``affinity`` first, so the first set in
        which a host appears is its best; the hosts of one match class are
        sorted and filled together, and the walk stops at the end of the
        first class that covers the demand, or once every host has been
        seen.  Returns the new shares and how many hosts were skipped for
        which reason.  ``exclude`` and ``limits`` (caps on free slots) serve
        ``replan``.
        """
        wanted = request.packages
        keys = [affinity(ps, wanted) for ps in self._pkgsets]
        tiebreak = self._tiebreak
        order = sorted(range(len(keys)), key=lambda j: (keys[j], tiebreak[j]))
        seed = zlib.crc32(request.request_id.encode() + b"\0")
        skipped = dict(self._skipped, failed=0)
        seen: set[int] = set()
        batch: list[_Candidate] = []
        shares: list[Share] = []
        current = -1
        everyone = len(self._usable)
        for j in order:
            if len(seen) == everyone:  # e.g. after the base image: the rest is no better
                break
            cls, neg_common, extra = keys[j]
            if cls != current:
                demand = _take(batch, demand, wanted, shares)
                batch, current = [], cls
                if demand <= 0:
                    break
            for i, t in self._holders[j]:
                if i in seen:
                    continue
                seen.add(i)
                h, free, nid = self._usable[i]
                if h.node_id in exclude:
                    skipped["failed"] += 1
                    continue
                if limits is not None and h.node_id in limits:
                    free = min(free, limits[h.node_id])
                    if free <= 0:
                        skipped["full"] += 1
                        continue
                batch.append(
                    (
                        cls,
                        h.status == "suspect",
                        neg_common,
                        extra,
                        not (t is not None and t.warm),
                        -free,
                        h.capacity.running_vms,
                        zlib.crc32(nid, seed),
                        h.node_id,
                        h,
                        t,
                        free,
                    )
                )
        _take(batch, demand, wanted, shares)
        return shares, skipped

    @property
    def blocked(self) -> tuple[str, ...]:
        """Why hosts that offer no VMs at all cannot ("h1: no base image ...")."""
        return self._blocked


def plan(request: PlacementRequest, hosts: Sequence[HostView] | HostIndex) -> Plan:
    """Rank ``hosts`` for ``request`` and fill them in order (see module doc).

    ``hosts`` must have distinct node ids (a gossip view does); a duplicate is
    a caller bug and raises ``InternalError``.
    """
    index = _index(hosts)
    shares, skipped = index.fill(request, request.count)
    return _finish(request, shares, skipped, frozenset(), index.blocked)


def replan(
    previous: Plan,
    failed_node_ids: Iterable[str],
    refused: Mapping[str, int],
    hosts: Sequence[HostView] | HostIndex,
) -> Plan:
    """Re-place what failed or was refused, over the current view ``hosts``.

    A failed host loses its share and is never used again for this request.
    A refused host (``refused[node_id]`` = how many it granted) keeps what it
    granted and gets nothing more.  A host that accepted its share may take
    more, up to the smaller of its room when planned minus its share and its
    free slots now: the view may or may not already count the VMs we sent it,
    and the smaller figure is right in both cases.  The new plan aims at the
    whole request, so VMs unplaced before are tried again.
    """
    failed = previous.failed | frozenset(failed_node_ids)
    kept: dict[str, Share] = {}
    for s in previous.shares:
        if s.node_id in failed:
            continue
        if s.node_id in refused:
            granted = max(0, min(refused[s.node_id], s.count))
            if granted:
                kept[s.node_id] = replace(s, count=granted, room=granted)
        else:
            kept[s.node_id] = s
    limits = {n: s.room - s.count for n, s in kept.items()}
    limits.update(dict.fromkeys(refused, 0))
    demand = previous.request.count - sum(s.count for s in kept.values())
    index = _index(hosts)
    extra, skipped = index.fill(previous.request, demand, failed, limits)
    for s in extra:
        k = kept.get(s.node_id)
        kept[s.node_id] = s if k is None else replace(k, count=k.count + s.count)
    return _finish(previous.request, list(kept.values()), skipped, failed, index.blocked)


# --- internals ---------------------------------------------------------------

# (class, suspect, -common, extra, -free, running VMs, tie hash, node id,
#  host, best template, free): a plain tuple sorts fastest, and node ids are
#  unique, so comparison never reaches the HostView.
_Candidate = tuple[
    int, bool, int, int, bool, int, int, int, str, HostView, TemplateInfo | None, int
]


def _rank(t: TemplateInfo) -> tuple[bool, str]:
    """Of one host's templates with the same packages: a warm one, then the smallest id."""
    return (not t.warm, t.template_id)


def _index(hosts: Sequence[HostView] | HostIndex) -> HostIndex:
    return hosts if isinstance(hosts, HostIndex) else HostIndex(hosts)


def _take(batch: list[_Candidate], demand: int, wanted: frozenset[str], out: list[Share]) -> int:
    """Sort one match class of candidates, fill them in order; return what is left."""
    batch.sort()
    for c in batch:
        if demand <= 0:
            break
        host, template, free = c[9], c[10], c[11]
        n = min(free, demand)
        demand -= n
        out.append(
            _share(
                host,
                template,
                count=n,
                free=free,
                wanted=wanted,
                match=MatchClass(c[0]),
                suspect=c[1],
            )
        )
    return demand


def _share(
    host: HostView,
    template: TemplateInfo | None,
    *,
    count: int,
    free: int,
    wanted: frozenset[str],
    match: MatchClass,
    suspect: bool,
) -> Share:
    pkgs = frozenset() if template is None else template.packages
    missing = tuple(sorted(wanted - pkgs))
    what = "base image" if template is None else f"template {template.template_id[:12]}"
    if match is MatchClass.EXACT:
        why = f"{what} holds exactly the requested packages"
    elif match is MatchClass.SUPERSET:
        why = f"{what} holds all requested packages (+{len(pkgs - wanted)} more)"
    elif match is MatchClass.PARTIAL:
        have = len(wanted) - len(missing)
        why = f"build from {what} ({have} of {len(wanted)} packages) + {', '.join(missing)}"
    else:
        why = f"no template in common: build from base image + {', '.join(missing)}"
    if template is not None and template.warm and match <= MatchClass.SUPERSET:
        why += "; warm start"
    if suspect:
        why += "; host is suspect"
    return Share(
        node_id=host.node_id,
        host=host.name,
        count=count,
        match=match,
        template_id=None if template is None else template.template_id,
        missing=missing,
        room=free,
        suspect=suspect,
        reason=why,
    )


def _finish(
    request: PlacementRequest,
    shares: list[Share],
    skipped: Mapping[str, int],
    failed: frozenset[str],
    blocked: tuple[str, ...] = (),
) -> Plan:
    placed = sum(s.count for s in shares)
    unplaced = max(0, request.count - placed)
    why = ""
    if unplaced:
        why = f"no capacity left in the mesh: {placed} of {request.count} placed"
        notes = [f"{n} {what}" for what, n in skipped.items() if n]
        if notes:
            why += f" (hosts skipped: {', '.join(notes)})"
        if blocked:
            why += "; " + "; ".join(blocked[:8])
    return Plan(request, tuple(shares), unplaced, why, failed)
