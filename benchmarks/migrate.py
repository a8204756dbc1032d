"""Migration between two lab hosts: live against offline, an idle guest and a busy one.

What it shows (issue 17, "Benchmarks"; thesis §5.4): how long a guest stands
still when it moves, as QEMU counts it and as the guest sees it, how long the
whole move takes and how many bytes cross the link, and after how long a run
moving a VM beats starting a fresh one.

Brings up a lab of two hosts (``vmmesh.lab``: network namespaces on a bridge,
real nodes, QEMU under TCG) with every host's uplink (``eth0``, its end of
the lab veth) shaped to 1 Gbit/s with ``tc tbf``, and ``vm_memory_mb = 1024``
in every node's environment, so the base image's warm state each host makes
has the 1 GB guests' shape and they resume it (a 512 MB state would not fit
them: they would boot cold).  The time that state takes is reported.  Then,
for each workload in turn:

* *idle*: a 1 GB guest, no packages, doing nothing but the counter;
* *busy*: the same with a memory writer: ``dd`` rewrites a ``--dirty-mb``
  file in ``/dev/shm`` (guest RAM) 8 MB at a time from a random 8 MB source,
  paced to at most ``--dirty-rate`` MB/s (the rate it reached, in the guest's
  own count over the 2 s before each move, is reported).  Paced, because a
  writer faster than the link never converges (live migration here has no
  auto-converge) and this machine's CPUs, not the link, set the rate.

the VM is requested on h1 (``vmmesh request NAME 1 --memory 1024``, timed
from the CLI's start to its exit: the fresh start the rule weighs), a
counter is started in it (bash stamps ``$EPOCHREALTIME`` every 10 ms into a
file in ``/run`` and, in a datagram, to 10.0.2.2: no process forked per
line), and ``--runs`` rounds move it back and forth between the hosts, live
and offline alternating (live first in even rounds, offline first in odd
ones) so the machine's noise falls on both.  Each move: the counter's file
emptied, 2 s of counting, ``vmmesh migrate VM --to OTHER [--offline]
--json`` timed from the CLI's start to its exit, 2 s more, then the file
read back.  QEMU's ``downtime``, the phases and the bytes are the
migration's own report.

Pause to running, two ways.  *Guest*: the largest gap between two lines of
the file.  The guest's clock stands still while it is paused and the target
sets it from the host's through the guest agent once it runs
(``migrate.target``), so the gap is the pause give or take how late each
such setting lands (the clock's lag behind the host's before and after the
move is reported, from the datagrams).  *Host*: the largest gap between the
datagrams' arrivals, on the host's clock: QEMU's user network delivers what
the guest sends to 10.0.2.2 to the loopback of the lab host the guest runs
on, where a listener of this script stamps it.  Targets are judged on the
worse of the two, by the worst run.

The break-even run time comes from ``vmmesh.migrate.rule.decide`` fed with
this run's figures: the median migration (its wire bytes over its measured
rate, plus its measured commit) against the median fresh start.

Prints medians (and maxima) beside the thesis's 102 s / 188 s migrations and
65 s break-even, and the targets: live downtime <= 300 ms, pause-to-running
<= 1 s, total <= 15 s for an idle guest; offline pause-to-running <= 3 s.
Needs root and the base image.  About 5 minutes with ``--runs 2`` on two
cores.  Everything it makes (qdiscs, namespaces, QEMU) goes with the lab.

    .venv/bin/python benchmarks/migrate.py [--runs 2] [--dirty-mb 160] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402  (lab_context skips through pytest when no lab can be made)

from benchmarks.report import print_result  # noqa: E402
from tests.labutil import lab_context, lab_unavailable  # noqa: E402
from tests.meshutil import all_up, base_warm, eventually  # noqa: E402
from vmmesh.lab import Lab  # noqa: E402
from vmmesh.migrate.rule import Figures, decide  # noqa: E402

BASE_DIR = Path(os.environ.get("VMMESH_BASE_IMAGE_DIR", "/var/cache/vmmesh-dev/base"))
MEMORY_MB = 1024
RATE = "1gbit"
PATIENCE = 600.0  # a warm state, a request
SETTLE = 2.0  # seconds of counting before and after each move
THESIS = "thesis: 102 s / 188 s"
THESIS_BREAK_EVEN = 65.0
LIVE_DOWNTIME_MS = 300
LIVE_PAUSE_S = 1.0
IDLE_TOTAL_S = 15.0
OFFLINE_PAUSE_S = 3.0
TICKS = "/run/vmm-ticks"
WRITTEN = "/run/vmm-dirty-mb"
PORT = 47613  # the counter's datagrams, on each lab host's loopback (slirp's 10.0.2.2)
COUNTER = f"""mkfifo /run/vmm-tick.fifo; exec 3<>/run/vmm-tick.fifo
while :; do
  t=$EPOCHREALTIME; echo $t >> {TICKS}; echo $t > /dev/udp/10.0.2.2/{PORT}
  read -t 0.01 -u 3
done"""
CHUNK_MB = 8
WRITER = """head -c {chunk}M /dev/urandom > /dev/shm/vmm-src
mkfifo /run/vmm-dirty.fifo; exec 3<>/run/vmm-dirty.fifo
n=0; off=0; t0=${{EPOCHREALTIME/./}}
while :; do
  dd if=/dev/shm/vmm-src of=/dev/shm/vmm-dirty bs=1M count={chunk} seek=$off conv=notrunc \\
    status=none
  off=$(( (off + {chunk}) % {mb} )); n=$((n + {chunk})); echo $n $EPOCHREALTIME > {written}
  d=$(( t0 + n * 1000000 / {rate} - ${{EPOCHREALTIME/./}} ))
  if (( d > 0 )); then printf -v f %06d $((d % 1000000)); read -t $((d / 1000000)).$f -u 3
  else t0=$((t0 - d)); fi  # starved: no catching up above the pace
done"""
LISTENER = """import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data = s.recv(64)
    sys.stdout.write(f"{time.time():.6f} {data.decode(errors='replace').strip()}\\n")
    sys.stdout.flush()
"""

Json = dict[str, Any]
Log = Callable[[str], None]


class Failed(Exception):
    """A step of the benchmark did not do what it must; the message says which."""


# --- the lab ------------------------------------------------------------------------


def _shape(lab: Lab, rate: str | None) -> None:
    """Every host's uplink at ``rate`` (None: the qdisc removed)."""
    for h in lab.hosts:
        tc = ["ip", "netns", "exec", h.netns, "tc", "qdisc"]
        if rate is None:
            subprocess.run([*tc, "del", "dev", "eth0", "root"], capture_output=True, check=False)
        else:
            subprocess.run([*tc, "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                            "burst", "1mb", "latency", "50ms"], check=True)  # fmt: skip


def _qdisc_stats(lab: Lab) -> dict[str, str]:
    out = {}
    for h in lab.hosts:
        r = subprocess.run(["ip", "netns", "exec", h.netns, "tc", "-s", "qdisc", "show", "dev",
                            "eth0"], capture_output=True, text=True, check=False)  # fmt: skip
        out[f"h{h.index}"] = " ".join(r.stdout.split())
    return out


def _cli(lab: Lab, *args: str, timeout: float = PATIENCE) -> tuple[Json, float]:
    """``vmmesh ARGS --json`` on h1 (any host may ask); (its answer, seconds from the CLI's
    start to its exit)."""
    cmd, *rest = args
    argv = [*lab.vmmesh_argv(), cmd, "--data-dir", lab.host(1).data_dir, "--json", *rest]
    started = time.monotonic()
    try:
        r = lab.lab_exec(1, argv, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failed(f"vmmesh {' '.join(args)}: no answer in {timeout:.0f} s") from None
    took = time.monotonic() - started
    if r.returncode:
        raise Failed(f"vmmesh {' '.join(args)}: {r.stderr.strip()[-400:]}")
    answer: Json = json.loads(r.stdout)
    return answer, took


def _sh(lab: Lab, vm: str, script: str) -> str:
    reply, _ = _cli(lab, "exec", vm, "--", "sh", "-c", script, timeout=120)
    if reply["exit_code"] != 0:
        raise Failed(f"in {vm}: {script[:60]!r} exited {reply['exit_code']}: {reply['stderr']}")
    return str(reply["stdout"])


def _background(lab: Lab, vm: str, script: str) -> None:
    _sh(lab, vm, f"setsid bash -c {shlex.quote(script)} </dev/null >/dev/null 2>&1 &")


def _where(lab: Lab, vm: str) -> tuple[str, str]:
    rows = [(v["host"], v["state"]) for v in _cli(lab, "vms")[0]["vms"] if v["name"] == vm]
    if len(rows) != 1:
        raise Failed(f"{vm} is listed {len(rows)} times: {rows}")
    return rows[0]


def _warm_states(lab: Lab, log: Log) -> Json:
    """Wait for both hosts' base warm state (1 GB shape); seconds and sizes."""
    started = time.monotonic()
    for i in (1, 2):
        eventually(base_warm, f"h{i} has its base image's warm state", lab, i,
                   patience=PATIENCE)  # fmt: skip
    took = time.monotonic() - started
    sizes = []
    for i in (1, 2):
        data = lab.host_data_dir(i)
        image_id = (data / "images" / "default").read_text().strip()
        state = data / "warm" / image_id
        sizes.append(sum(f.stat().st_size for f in state.iterdir() if f.is_file()))
    log(f"base warm states ready {took:.0f} s after the mesh came up ({sizes} bytes)")
    return {"ready_s": round(took, 1), "mb": [round(s / 1e6) for s in sizes]}


# --- one move -----------------------------------------------------------------------


class Listeners:
    """A UDP listener on each lab host's loopback: the host's clock at each of the
    counter's datagrams (QEMU's user network sends what the guest sends to 10.0.2.2
    from the host the guest runs on), with the guest's own stamp."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.files = [tmp / f"udp-h{h.index}.txt" for h in lab.hosts]
        self.procs = []
        for h, path in zip(lab.hosts, self.files, strict=True):
            with path.open("wb") as out:
                argv = ["ip", "netns", "exec", h.netns, sys.executable, "-u", "-c", LISTENER,
                        str(PORT)]  # fmt: skip
                self.procs.append(subprocess.Popen(argv, stdout=out, stdin=subprocess.DEVNULL))

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def seen(self, since: float, until: float) -> list[tuple[float, float]]:
        """(host time, guest stamp) of the datagrams that arrived in [since, until]."""
        out = []
        for path in self.files:
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    host, guest = (float(x.replace(",", ".")) for x in line.split())
                    if since <= host <= until:
                        out.append((host, guest))
        return sorted(out)


def _gaps(stamps: list[float]) -> tuple[float, float]:
    """(largest gap, the largest other one) between successive stamps, in seconds."""
    gaps = sorted((b - a for a, b in itertools.pairwise(stamps)), reverse=True)
    if len(gaps) < 2:
        raise Failed(f"the counter wrote {len(stamps)} lines")
    return gaps[0], gaps[1]


def _stamps(text: str) -> list[float]:
    stamps = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            stamps.append(float(line.replace(",", ".")))
    return stamps


def _lag_ms(seen: list[tuple[float, float]]) -> float | None:
    """How far the guest's clock is behind the host's (ms, median), from datagrams."""
    return round(statistics.median(h - g for h, g in seen) * 1000, 1) if seen else None


def _written(lab: Lab, vm: str) -> tuple[int, float]:
    """The writer's MB so far and the guest's time it wrote them."""
    out = _sh(lab, vm, f"cat {WRITTEN}").split()
    if len(out) != 2:
        raise Failed(f"the writer's count reads {out}")
    return int(out[0]), float(out[1].replace(",", "."))


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _move(lab: Lab, udp: Listeners, vm: str, mode: str, busy: bool) -> Json:
    src, state = _where(lab, vm)
    if state != "running":
        raise Failed(f"{vm} is {state} on {src}")
    dst = "h2" if src == "h1" else "h1"
    load = _load()
    t0 = time.time()
    _sh(lab, vm, f": > {TICKS}")
    first = _written(lab, vm) if busy else None
    time.sleep(SETTLE)
    last = _written(lab, vm) if busy else None
    args = ["migrate", vm, "--to", dst, *(["--offline"] if mode == "offline" else [])]
    t1 = time.time()
    report, wall = _cli(lab, *args, timeout=240)
    t2 = time.time()
    time.sleep(SETTLE)
    where = _where(lab, vm)
    if where != (dst, "running"):
        raise Failed(f"after the move {vm} is {where}, not running on {dst}")
    stamps = _stamps(_sh(lab, vm, f"cat {TICKS}"))
    t3 = time.time()
    gap, other = _gaps(stamps)
    seen = udp.seen(t0, t3)
    host_gap = _gaps([h for h, _ in seen])[0] if len(seen) > 2 else None
    out = {
        "mode": mode,
        "source": src,
        "target": dst,
        "load": load,
        "total_s": round(wall, 3),
        "report_s": report["seconds"],
        "downtime_ms": report.get("downtime_ms") if mode == "live" else None,
        "qemu_total_ms": report.get("total_time_ms"),
        "pause_s": round(gap, 3),
        "pause_host_s": round(host_gap, 3) if host_gap is not None else None,
        "other_gap_s": round(other, 3),
        "ticks": len(stamps),
        "datagrams": len(seen),
        "clock_lag_before_ms": _lag_ms([x for x in seen if x[0] < t1]),
        "clock_lag_after_ms": _lag_ms([x for x in seen if x[0] > t2]),
        "wire_bytes": report["wire_bytes"],
        "ram_bytes": report["ram_bytes"],
        "disk_bytes": report["disk_bytes"],
        "phases": {p["name"]: p["seconds"] for p in report["phases"]},
    }
    if first is not None and last is not None and last[1] > first[1]:
        out["dirty_mb_s"] = round((last[0] - first[0]) / (last[1] - first[1]), 1)
    return out


# --- the benchmark ------------------------------------------------------------------


def _workload(lab: Lab, udp: Listeners, args: argparse.Namespace, busy: bool, log: Log) -> Json:
    name = "migbusy" if busy else "migidle"
    vm = f"{name}-1"
    made, wall = _cli(lab, "request", name, "1", "--memory", str(MEMORY_MB))
    if made["placed"] != 1:
        raise Failed(f"request {name}: {made}")
    start = {"request_s": round(wall, 3), "start": made["vms"][0]["start"],
             "note": made["vms"][0]["start_note"], "host": made["vms"][0]["host"]}  # fmt: skip
    log(f"{vm} made on {start['host']} in {wall:.2f} s ({start['start']})")
    out: Json = {"workload": "busy" if busy else "idle", "fresh_start": start, "moves": []}
    try:
        _background(lab, vm, COUNTER)
        if busy:
            writer = WRITER.format(chunk=CHUNK_MB, mb=args.dirty_mb, written=WRITTEN,
                                   rate=args.dirty_rate)  # fmt: skip
            _background(lab, vm, writer)
            eventually(lambda: _written(lab, vm)[0] >= args.dirty_mb, "one pass of the writer",
                       patience=120)  # fmt: skip
        for r in range(args.runs):
            for mode in ("live", "offline") if r % 2 == 0 else ("offline", "live"):
                move = _move(lab, udp, vm, mode, busy)
                log(f"{vm} {mode} {move['source']}->{move['target']}: {json.dumps(move)}")
                out["moves"].append(move)
    except (Failed, AssertionError) as exc:
        out["error"] = str(exc)
        log(f"{vm}: {exc}")
    with contextlib.suppress(Failed):
        _cli(lab, "shutdown", name)
    return out


def bench(lab: Lab, args: argparse.Namespace, tmp: Path, log: Log) -> Json:
    for i in (1, 2):
        eventually(all_up, f"h{i} sees two hosts up", lab, i, 2)
    warm = _warm_states(lab, log)
    load = _load()
    _shape(lab, RATE)
    udp = Listeners(lab, tmp)
    try:
        workloads = [_workload(lab, udp, args, busy, log) for busy in (False, True)]
        qdiscs = _qdisc_stats(lab)
    finally:
        udp.close()
        _shape(lab, None)
    result: Json = {
        "load_at_start": load,
        "runs": args.runs,
        "memory_mb": MEMORY_MB,
        "link": RATE,
        "dirty_mb": args.dirty_mb,
        "dirty_rate_target": args.dirty_rate,
        "warm_state": warm,
        "workloads": workloads,
        "qdiscs": qdiscs,
    }
    result["rows"] = _rows(workloads)
    result["break_even"] = _break_even(workloads)
    return result


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


FIGURES = ("downtime_ms", "pause_s", "pause_host_s", "total_s", "wire_bytes", "ram_bytes",
           "disk_bytes", "other_gap_s", "dirty_mb_s", "load")  # fmt: skip


def _rows(workloads: list[Json]) -> list[Json]:
    rows = []
    for w in workloads:
        for mode in ("live", "offline"):
            moves = [m for m in w["moves"] if m["mode"] == mode]
            pick = {k: [float(m[k]) for m in moves if m.get(k) is not None] for k in FIGURES}
            row: Json = {"workload": w["workload"], "mode": mode, "n": len(moves)}
            for k, v in pick.items():
                row[k] = _median(v)
                row[f"{k}_max"] = max(v) if v else None
            row["met"] = _verdicts(row)
            rows.append(row)
    return rows


def _verdicts(row: Json) -> dict[str, bool]:
    """Each target that applies to the row, met (by the worst run, and for the pause by
    the worse of the guest's clock and the host's) or not."""
    if not row["n"]:
        return {}
    met = {}
    pause = max(v for v in (row["pause_s_max"], row["pause_host_s_max"]) if v is not None)
    if row["mode"] == "live":
        met["downtime"] = row["downtime_ms_max"] is not None and (
            row["downtime_ms_max"] <= LIVE_DOWNTIME_MS
        )
        met["pause"] = pause <= LIVE_PAUSE_S
        if row["workload"] == "idle":
            met["total"] = row["total_s_max"] <= IDLE_TOTAL_S
    else:
        met["pause"] = pause <= OFFLINE_PAUSE_S
    return met


def _break_even(workloads: list[Json]) -> Json:
    """``rule.decide`` fed with this run's figures, per workload and mode."""
    starts = [w["fresh_start"]["request_s"] for w in workloads]
    start_s = statistics.median(starts)
    out: Json = {"fresh_start_s": round(start_s, 3), "fresh_starts_s": starts, "rows": []}
    for w in workloads:
        for mode in ("live", "offline"):
            moves = [m for m in w["moves"] if m["mode"] == mode]
            if not moves:
                continue
            resume = statistics.median(m["phases"].get("commit", 0.0) for m in moves)
            total = statistics.median(m["total_s"] for m in moves)
            wire = statistics.median(m["wire_bytes"] for m in moves)
            rate = wire / max(1e-3, total - resume)  # what the move moved per second
            d = decide(Figures(run_seconds=THESIS_BREAK_EVEN, bytes_to_move=int(wire), rate=rate,
                               resume_seconds=resume, start_seconds=start_s))  # fmt: skip
            out["rows"].append({
                "workload": w["workload"],
                "mode": mode,
                "migrate_s": round(d.migrate_seconds or 0.0, 3),
                "rate_mb_s": round(rate / 1e6, 1),
                "break_even_s": round(d.break_even, 2) if d.break_even is not None else None,
                "at_65_s": d.why,
            })  # fmt: skip
    return out


# --- printing -----------------------------------------------------------------------


def _f(v: float | None, fmt: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{unit}"


def _pair(row: Json, key: str, fmt: str, unit: str) -> str:
    """The median and, in brackets, the maximum."""
    return f"{_f(row[key], fmt, unit)} ({_f(row[key + '_max'], fmt)})"


def _print(result: Json) -> None:
    warm = result["warm_state"]
    print(
        f"migration between 2 lab hosts, link {result['link']} (tc tbf), "
        f"{result['memory_mb']} MB / 1 vCPU guests under TCG; medians of {result['runs']} "
        f"(max in brackets)"
    )
    print(
        f"base warm state of the 1 GB shape: {warm['mb']} MB, ready {warm['ready_s']:.0f} s "
        f"after the mesh was up"
    )
    print(f"{'':<15} {'QEMU down':>13} {'pause, guest':>15} {'pause, host':>15} {'total':>15}"
          f" {'wire MB':>8} {'RAM MB':>7} {'disk MB':>7}  targets")  # fmt: skip
    for r in result["rows"]:
        if not r["n"]:
            print(f"{r['workload']}, {r['mode']:<9} no run")
            continue
        verdict = ", ".join(f"{k} {'MET' if ok else 'NOT MET'}" for k, ok in r["met"].items())
        down = _pair(r, "downtime_ms", ".0f", " ms") if r["mode"] == "live" else "-"
        print(
            f"{r['workload'] + ', ' + r['mode']:<15} {down:>13}"
            f" {_pair(r, 'pause_s', '.2f', ' s'):>15} {_pair(r, 'pause_host_s', '.2f', ' s'):>15}"
            f" {_pair(r, 'total_s', '.2f', ' s'):>15}"
            f" {r['wire_bytes'] / 1e6:>8.1f} {r['ram_bytes'] / 1e6:>7.1f}"
            f" {r['disk_bytes'] / 1e6:>7.1f}  {verdict}"
        )
        extra = f"    other gaps at most {r['other_gap_s_max']:.2f} s; load {r['load']:.1f}"
        if r["dirty_mb_s"] is not None:
            extra += f"; writer {r['dirty_mb_s']:.1f} MB/s over {result['dirty_mb']} MB"
        print(extra)
    print(
        f"targets: live downtime <= {LIVE_DOWNTIME_MS} ms, pause <= {LIVE_PAUSE_S:g} s, "
        f"total <= {IDLE_TOTAL_S:g} s idle; offline pause <= {OFFLINE_PAUSE_S:g} s; {THESIS}"
    )
    be = result["break_even"]
    print(
        f"fresh start (vmmesh request, {result['memory_mb']} MB, no packages): "
        f"{be['fresh_start_s']:.2f} s (runs {be['fresh_starts_s']})"
    )
    for r in be["rows"]:
        print(
            f"break-even, {r['workload']} {r['mode']}: {_f(r['break_even_s'], '.1f', ' s')}"
            f" (move {r['migrate_s']:.1f} s at {r['rate_mb_s']:.0f} MB/s)"
            f"  thesis: {THESIS_BREAK_EVEN:.0f} s"
        )
    for w in result["workloads"]:
        if "error" in w:
            print(f"{w['workload']}: FAILED: {w['error']}")


@contextlib.contextmanager
def _lab(tmp: Path) -> Iterator[Lab]:
    env = {"VMMESH_VM_MEMORY_MB": str(MEMORY_MB)}
    with lab_context(tmp, 2, start_nodes=True, node_args=["--accel=tcg"], env=env,
                     image=BASE_DIR) as lab:  # fmt: skip
        yield lab


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=2, help="rounds of live + offline (2)")
    ap.add_argument("--dirty-mb", type=int, default=160, help="the busy writer's file (160)")
    ap.add_argument("--dirty-rate", type=int, default=32, help="its pace, MB/s at most (32)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if (
        args.runs < 1
        or args.dirty_mb < CHUNK_MB
        or args.dirty_mb % CHUNK_MB
        or args.dirty_rate <= 0
    ):
        ap.error(f"need --runs >= 1, --dirty-mb a multiple of {CHUNK_MB}, --dirty-rate > 0")
    if reason := lab_unavailable():
        print(f"migrate: {reason}", file=sys.stderr)
        return 2
    if not (BASE_DIR / "manifest.json").is_file():
        print(f"migrate: no base image in {BASE_DIR}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="vmmesh-migbench-", dir="/var/tmp") as tmp:
            log("bringing up a lab of 2 hosts")
            with _lab(Path(tmp)) as lab:
                log(f"lab {lab.tag} up in {time.monotonic() - started:.1f} s")
                result = bench(lab, args, Path(tmp), log)
    except pytest.skip.Exception as exc:
        print(f"migrate: cannot make a lab: {exc}", file=sys.stderr)
        return 2
    result["wall_s"] = round(time.monotonic() - started, 1)
    print_result(result, args, _print)
    return 1 if any("error" in w for w in result["workloads"]) else 0


if __name__ == "__main__":
    sys.exit(main())
