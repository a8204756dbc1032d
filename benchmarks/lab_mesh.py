"""Lab mesh benchmark: gossip spread and failure detection between real nodes.

Builds a lab of ``--hosts`` hosts on this machine (network namespaces on a
bridge, each running ``vmmesh node``, joined into one mesh by mDNS; see
``vmmesh/lab.py``), waits until every host sees every other one ``up``, and
then, ``--repeat`` times, on a host chosen in turn (hN, hN-1, ...):

1. change: writes a new ``storage_quota_mb`` into the host's config.toml and
   sends SIGHUP; measures seconds until the host itself, then every other
   host, shows the new ``capacity.storage_quota_mb`` for it;
2. kill: SIGKILLs the host's node; seconds until every other host marks it
   ``suspect`` and then ``down`` (target <= 10 s in the lab);
3. restart: starts the node again; seconds until its control socket answers
   and until every other host sees it ``up`` again.

Each host's view is read in-process over its control socket (Unix sockets
are not network-namespaced), one connection per host kept open and polled
every 50 ms, so times are exact to about 50 ms plus one call.  Times are
from the signal (or process start) to the poll that first saw the state.
Prints p50 / max over the repeats beside the target.  Needs root.

    python benchmarks/lab_mesh.py [--hosts 3] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402  (lab_context skips through pytest when no lab can be made)
import trio  # noqa: E402

from tests.labutil import lab_context, lab_unavailable  # noqa: E402
from vmmesh.errors import VmmeshError  # noqa: E402
from vmmesh.lab import Lab  # noqa: E402
from vmmesh.net.control import connect_control  # noqa: E402

POLL = 0.05  # seconds between two reads of one host's view
CALL_TIMEOUT = 2.0  # a node that does not answer one call within this is re-dialled
SETTLE = 3.0  # seconds of all-up before each measurement (detector sees steady beats)
DOWN_TARGET = 10.0
GOSSIP_ANCHOR = "SPEC: <= 8 rounds p99 at N=1000 (simulation, benchmarks/gossip_sim.py)"

Row = dict[str, Any]  # one host's row of `node.peers`
Pred = Callable[[list[Row]], bool]


def _row(hosts: list[Row], name: str) -> Row | None:
    for h in hosts:
        if h.get("name") == name:
            return h
    return None


def _quota_is(name: str, value: int) -> Pred:
    def pred(hosts: list[Row]) -> bool:
        row = _row(hosts, name)
        return row is not None and row.get("capacity", {}).get("storage_quota_mb") == value

    return pred


def _status_in(name: str, statuses: frozenset[str]) -> Pred:
    def pred(hosts: list[Row]) -> bool:
        row = _row(hosts, name)
        return row is not None and row.get("status") in statuses

    return pred


def _all_up(names: set[str]) -> Pred:
    def pred(hosts: list[Row]) -> bool:
        seen = {h.get("name"): h.get("status") for h in hosts}
        return all(seen.get(n) == "up" for n in names)

    return pred


@dataclass
class Probe:
    """A condition on some hosts' views; records when each first met it."""

    observers: set[int]
    pred: Pred
    after: float = 0.0  # only polls answered after this moment count
    hits: dict[int, float] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)

    def offer(self, i: int, t: float, hosts: list[Row]) -> None:
        if i in self.observers and i not in self.hits and t >= self.after and self.pred(hosts):
            self.hits[i] = t
            if set(self.hits) >= self.observers:
                self.done.set()


class Watcher:
    """One task per host polls ``node.peers`` every POLL s on a kept-open connection."""

    def __init__(self, lab: Lab) -> None:
        self.socks = {h.index: Path(h.data_dir) / "node.sock" for h in lab.hosts}
        self.probes: list[Probe] = []
        self.answered: dict[int, float] = {}  # host -> time of its latest answer
        self.latest: dict[int, list[Row]] = {}
        self.reconnects: dict[int, int] = dict.fromkeys(self.socks, 0)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for i in self.socks:
                nursery.start_soon(self._watch, i)

    async def _watch(self, i: int) -> None:
        while True:
            try:
                async with connect_control(self.socks[i]) as conn:
                    while True:
                        with trio.fail_after(CALL_TIMEOUT):
                            reply = await conn.call("node.peers", {})
                        t = time.monotonic()
                        hosts: list[Row] = list(reply.get("hosts", []))
                        self.answered[i] = t
                        self.latest[i] = hosts
                        for probe in list(self.probes):
                            probe.offer(i, t, hosts)
                        await trio.sleep(POLL)
            except (
                VmmeshError,
                OSError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
                ExceptionGroup,
            ):
                self.reconnects[i] += 1
                await trio.sleep(POLL)

    async def wait(self, probe: Probe, patience: float) -> dict[int, float]:
        """Hits of ``probe`` (host -> monotonic time); partial if patience ran out."""
        self.probes.append(probe)
        try:
            with trio.move_on_after(patience):
                await probe.done.wait()
        finally:
            self.probes.remove(probe)
        return dict(probe.hits)


def _set_quota(cfg: Path, original: str | None, value: int) -> None:
    keep = (
        []
        if original is None
        else [
            line
            for line in original.splitlines()
            if not line.strip().startswith("storage_quota_mb")
        ]
    )
    cfg.write_text("\n".join([*keep, f"storage_quota_mb = {value}"]) + "\n")


def _restore(cfg: Path, original: str | None) -> None:
    if original is None:
        cfg.unlink(missing_ok=True)
    else:
        cfg.write_text(original)


def _after(hits: dict[int, float], t0: float, expected: set[int]) -> float | None:
    """Seconds from t0 until the last of ``expected`` hit; None if one never did."""
    if not expected or not expected <= set(hits):
        return None
    return round(max(hits[i] for i in expected) - t0, 3)


def _first(hits: dict[int, float], t0: float) -> float | None:
    return round(min(hits.values()) - t0, 3) if hits else None


class Bench:
    def __init__(self, lab: Lab, watcher: Watcher, patience: float) -> None:
        self.lab = lab
        self.w = watcher
        self.patience = patience
        self.all = {h.index for h in lab.hosts}
        self.names = {f"h{i}" for i in self.all}

    async def converge(self) -> float | None:
        """Wait until every host sees every host up; seconds it took, None if never."""
        t0 = time.monotonic()
        hits = await self.w.wait(Probe(set(self.all), _all_up(self.names)), self.patience)
        if set(hits) != self.all:
            return None
        await trio.sleep(SETTLE)
        return round(max(hits.values()) - t0, 3)

    async def change(self, i: int, value: int) -> dict[str, Any]:
        name, others = f"h{i}", self.all - {i}
        cfg = self.lab.host_data_dir(i) / "config.toml"
        original = cfg.read_text() if cfg.exists() else None
        _set_quota(cfg, original, value)
        try:
            probe = Probe(set(self.all), _quota_is(name, value))
            t0 = time.monotonic()
            probe.after = t0
            self.lab.kill_host(i, signal.SIGHUP)
            hits = await self.w.wait(probe, self.patience)
        finally:
            # Put the config back (and reload it) so later runs start from the original.
            _restore(cfg, original)
            self.lab.kill_host(i, signal.SIGHUP)
        origin = _after(hits, t0, {i})
        spread = _after(hits, t0, others)
        return {
            "origin_s": origin,
            "spread_s": spread,
            "spread_after_origin_s": (
                round(spread - origin, 3) if spread is not None and origin is not None else None
            ),
            "not_reached": sorted(f"h{j}" for j in others - set(hits)),
        }

    async def kill_restart(self, i: int) -> dict[str, Any]:
        name, others = f"h{i}", self.all - {i}
        suspect = Probe(set(others), _status_in(name, frozenset({"suspect", "down"})))
        down = Probe(set(others), _status_in(name, frozenset({"down"})))
        t0 = time.monotonic()
        suspect.after = down.after = t0
        self.w.probes += [suspect]  # recorded alongside the down wait
        try:
            self.lab.kill_host(i, signal.SIGKILL)
            down_hits = await self.w.wait(down, self.patience)
        finally:
            self.w.probes.remove(suspect)
        out: dict[str, Any] = {
            "suspect_first_s": _first(suspect.hits, t0),
            "suspect_all_s": _after(suspect.hits, t0, others),
            "down_first_s": _first(down_hits, t0),
            "down_all_s": _after(down_hits, t0, others),
            "not_marked_down": sorted(f"h{j}" for j in others - set(down_hits)),
        }
        # Restart: time from process start until the peers see it up again.
        up = Probe(set(others), _status_in(name, frozenset({"up"})))
        ready = Probe({i}, lambda hosts: True)
        sees_all = Probe({i}, _all_up(self.names))
        t1 = time.monotonic()
        up.after = ready.after = sees_all.after = t1
        self.w.probes += [ready, sees_all]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._start_host, i)
                up_hits = await self.w.wait(up, self.patience)
            with trio.move_on_after(self.patience):
                await sees_all.done.wait()
        finally:
            self.w.probes.remove(ready)
            self.w.probes.remove(sees_all)
        out |= {
            "restart_ready_s": _first(ready.hits, t1),
            "restart_up_all_s": _after(up_hits, t1, others),
            "restart_sees_all_s": _first(sees_all.hits, t1),
            "not_seen_up": sorted(f"h{j}" for j in others - set(up_hits)),
        }
        return out

    async def _start_host(self, i: int) -> None:
        # Blocking (spawns the node, then polls the CLI until it answers): in a thread.
        self.lab = await trio.to_thread.run_sync(self.lab.start_host, i)


async def bench(lab: Lab, repeat: int, patience: float, log: Callable[[str], None]) -> Row:
    w = Watcher(lab)
    b = Bench(lab, w, patience)
    runs: list[dict[str, Any]] = []
    first_converge: float | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.run)
        first_converge = await b.converge()
        log(f"mesh converged (all {len(b.all)} hosts up everywhere) in {first_converge} s")
        n = len(b.all)
        for r in range(repeat):
            i = n - r % n
            run: dict[str, Any] = {"run": r + 1, "host": f"h{i}"}
            if r and await b.converge() is None:
                run["error"] = "mesh did not converge before this run"
                runs.append(run)
                break
            run["change"] = await b.change(i, 1000 + 37 * (r + 1))
            run["kill"] = await b.kill_restart(i)
            log(f"run {r + 1}/{repeat} on h{i}: {json.dumps(run)}")
            runs.append(run)
        await b.converge()
        nursery.cancel_scope.cancel()
    return {"first_converge_s": first_converge, "runs": runs, "reconnects": w.reconnects}


# --- report -----------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str  # "section.field" in each run
    label: str
    target: str
    limit: float | None = None  # pass/fail bound on max, if any


def metrics(interval: float) -> list[Metric]:
    return [
        Metric("change.origin_s", "change: host itself applies it (s)", "report"),
        Metric(
            "change.spread_s",
            "change: reached every other host (s)",
            f"report; gossip interval {interval:g} s",
        ),
        Metric("change.rounds", "change: same, in gossip intervals", GOSSIP_ANCHOR),
        Metric("kill.suspect_all_s", "SIGKILL: all peers suspect it (s)", "report"),
        Metric(
            "kill.down_all_s",
            "SIGKILL: all peers mark it down (s)",
            f"<= {DOWN_TARGET:g} s",
            DOWN_TARGET,
        ),
        Metric("kill.restart_ready_s", "restart: its node answers (s)", "report"),
        Metric("kill.restart_up_all_s", "restart: up again at all peers (s)", "report"),
        Metric("kill.restart_sees_all_s", "restart: it sees all peers up (s)", "report"),
    ]


def _value(run: dict[str, Any], key: str, interval: float) -> float | None:
    section, _, name = key.partition(".")
    part = run.get(section, {})
    if name == "rounds":
        s = part.get("spread_s")
        return round(s / interval, 1) if s is not None else None
    v = part.get(name)
    return float(v) if v is not None else None


def summarise(runs: list[dict[str, Any]], interval: float) -> list[Row]:
    rows = []
    for m in metrics(interval):
        values = [_value(r, m.key, interval) for r in runs if "change" in r]
        got = [v for v in values if v is not None]
        worst = max(got) if got else None
        missing = len(values) - len(got)
        met: bool | None = None
        if m.limit is not None:
            met = worst is not None and worst <= m.limit and not missing
        rows.append(
            {
                "metric": m.key,
                "label": m.label,
                "n": len(got),
                "missing": missing,
                "p50": round(statistics.median(got), 3) if got else None,
                "max": round(worst, 3) if worst is not None else None,
                "target": m.target,
                "met": met,
            }
        )
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.2f}"


def print_table(rows: list[Row], hosts: int, repeat: int, interval: float) -> None:
    print(
        f"lab mesh: {hosts} hosts, {repeat} repeats, gossip interval {interval:g} s, "
        f"poll {POLL * 1000:.0f} ms"
    )
    print(f"{'metric':<40} {'p50':>6} {'max':>6} {'n':>3}  target")
    for r in rows:
        verdict = "" if r["met"] is None else ("  MET" if r["met"] else "  NOT MET")
        miss = f" ({r['missing']} never)" if r["missing"] else ""
        print(
            f"{r['label']:<40} {_fmt(r['p50']):>6} {_fmt(r['max']):>6} {r['n']:>3}  "
            f"{r['target']}{verdict}{miss}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--hosts", type=int, default=3, help="lab hosts (3)")
    p.add_argument("--repeat", type=int, default=3, help="runs of change + kill + restart (3)")
    p.add_argument(
        "--gossip-interval",
        type=float,
        default=0.5,
        help="passed to every node (0.5, the default of `vmmesh node`)",
    )
    p.add_argument(
        "--patience",
        type=float,
        default=50.0,
        help="give up waiting for one state after this many seconds (50; a host "
        "down for 60 s is forgotten)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.hosts < 2 or args.repeat < 1:
        p.error("need --hosts >= 2 and --repeat >= 1")
    if reason := lab_unavailable():
        print(f"lab_mesh: {reason}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    node_args = ("--gossip-interval", str(args.gossip_interval))
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="vmmesh-labbench-") as tmp:
            log(f"bringing up a lab of {args.hosts} hosts")
            with lab_context(Path(tmp), args.hosts, start_nodes=True, node_args=node_args) as lab:
                log(f"lab {lab.tag} up in {time.monotonic() - started:.1f} s")
                result = trio.run(bench, lab, args.repeat, args.patience, log)
    except pytest.skip.Exception as exc:
        print(f"lab_mesh: cannot make a lab: {exc}", file=sys.stderr)
        return 2
    rows = summarise(result["runs"], args.gossip_interval)
    if args.json:
        json.dump(
            {
                "hosts": args.hosts,
                "repeat": args.repeat,
                "gossip_interval_s": args.gossip_interval,
                "poll_s": POLL,
                "results": rows,
                **result,
                "wall_s": round(time.monotonic() - started, 1),
            },
            sys.stdout,
            indent=2,
        )
        print()
    else:
        print_table(rows, args.hosts, args.repeat, args.gossip_interval)
    failed = any(r["met"] is False for r in rows) or any("error" in r for r in result["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
