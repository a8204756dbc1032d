"""A wire form of the planner's plans, for tests only: plans never cross the wire
(the request's answer carries ``api.vm.PlannedShare``), but a plan that survives a
msgpack round trip, and a decoder that refuses what it cannot trust, are a handy
check that a plan is plain data."""

from __future__ import annotations

from typing import Any

from vmmesh.api.names import check_hex_id, check_package, check_vm_name
from vmmesh.errors import MalformedMessage, UnknownMessage
from vmmesh.placement.planner import MAX_REQUEST_ID, MatchClass, PlacementRequest, Plan, Share

WIRE_VERSION = 1


def request_to_wire(r: PlacementRequest) -> dict[str, Any]:
    return {
        "v": WIRE_VERSION,
        "id": r.request_id,
        "name": r.name,
        "count": r.count,
        "pkgs": sorted(r.packages),
    }


def request_from_wire(d: object) -> PlacementRequest:
    d = _versioned(d, "placement request")
    rid, count, pkgs = d.get("id"), d.get("count"), d.get("pkgs")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID:
        raise MalformedMessage(f"bad request id: {rid!r:.80}")
    if not isinstance(pkgs, list):
        raise MalformedMessage("request packages are not a list")
    return PlacementRequest(
        request_id=rid,
        name=check_vm_name(d.get("name")),
        count=_count(count, "count"),
        packages=frozenset(check_package(p) for p in pkgs),
    )


def share_to_wire(s: Share) -> dict[str, Any]:
    return {
        "node_id": s.node_id,
        "host": s.host,
        "count": s.count,
        "match": s.match.name.lower(),
        "template": s.template_id,
        "missing": list(s.missing),
        "room": s.room,
        "suspect": s.suspect,
        "reason": s.reason,
    }


def share_from_wire(d: object) -> Share:
    if not isinstance(d, dict):
        raise MalformedMessage("share is not a map")
    host, match, template = d.get("host"), d.get("match"), d.get("template")
    missing, suspect, reason = d.get("missing"), d.get("suspect"), d.get("reason")
    if not isinstance(host, str) or not isinstance(reason, str):
        raise MalformedMessage("share host or reason is not a string")
    if not isinstance(match, str) or match.upper() not in MatchClass.__members__:
        raise MalformedMessage(f"bad match class: {match!r:.80}")
    if not isinstance(missing, list) or not isinstance(suspect, bool):
        raise MalformedMessage("share fields have the wrong type")
    return Share(
        node_id=check_hex_id(d.get("node_id"), "node id"),
        host=host,
        count=_count(d.get("count"), "share count"),
        match=MatchClass[match.upper()],
        template_id=None if template is None else check_hex_id(template, "template id"),
        missing=tuple(check_package(p) for p in missing),
        room=_count(d.get("room"), "share room"),
        suspect=suspect,
        reason=reason,
    )


def plan_to_wire(p: Plan) -> dict[str, Any]:
    return {
        "v": WIRE_VERSION,
        "request": request_to_wire(p.request),
        "shares": [share_to_wire(s) for s in p.shares],
        "unplaced": p.unplaced,
        "unplaced_reason": p.unplaced_reason,
        "failed": sorted(p.failed),
    }


def plan_from_wire(d: object) -> Plan:
    d = _versioned(d, "plan")
    shares, failed, why = d.get("shares"), d.get("failed"), d.get("unplaced_reason")
    if not isinstance(shares, list) or not isinstance(failed, list):
        raise MalformedMessage("plan shares or failed hosts are not a list")
    if not isinstance(why, str):
        raise MalformedMessage("plan unplaced reason is not a string")
    return Plan(
        request=request_from_wire(d.get("request")),
        shares=tuple(share_from_wire(s) for s in shares),
        unplaced=_count(d.get("unplaced"), "unplaced count"),
        unplaced_reason=why,
        failed=frozenset(check_hex_id(n, "node id") for n in failed),
    )


def _versioned(d: object, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise MalformedMessage(f"{what} is not a map")
    if d.get("v") != WIRE_VERSION:
        raise UnknownMessage(f"{what} version {d.get('v')!r:.20} is not {WIRE_VERSION}")
    return d


def _count(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise MalformedMessage(f"bad {what}: {v!r:.80}")
    return v
