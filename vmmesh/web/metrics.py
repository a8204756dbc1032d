"""``GET /metrics`` and ``GET /sd``: the mesh as one node sees it, in Prometheus's formats.

Pure: ``Figures`` is what the node already knows (its ``vmmesh status`` reply
with the figures the node and its extensions publish, its gossip view, its
own VMs and their sampled usage), taken in one go by the service;
``MeshCollector`` only renames it into metric families (``published``: one
family per figure name, whatever extension made it), and
``render`` is ``prometheus_client.generate_latest`` over that collector, in
the scraping task, with no registry, thread or background loop of its own.

Names follow Prometheus's rules: base units (bytes, seconds), ``_total`` on
counters, ``_info`` on series that carry labels and the value 1.  Every host
serves the whole mesh from its gossip view (``vmmesh_member_*``, labelled by
``member`` and ``member_id``), so the others still say a host is down after it
died; what only the scraped host knows (its refusals, its VMs' states, its
migrations) is ``vmmesh_node_*``-like series without a member label.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vmmesh.api.figures import Figure, Kind
from vmmesh.api.node import StatusReply
from vmmesh.api.vm import VmRow
from vmmesh.gossip.hoststate import HostView
from vmmesh.web.vmstats import VmUsage

MB = 1 << 20
STATES = ("up", "suspect", "down", "draining", "joining")


def member_state(h: HostView) -> str:
    """One of ``STATES``: gossip's up/suspect/down, ``draining`` for an up host
    that takes no new VMs (Prometheus's ``up`` cannot say that), and ``joining``
    for a host found whose state has not arrived yet."""
    return "draining" if h.status == "up" and h.draining else h.status


@dataclass(frozen=True)
class Figures:
    """What one scrape shows, as the node knows it at that moment."""

    status: StatusReply
    hosts: Sequence[HostView]
    now: float  # unix time
    vms: Sequence[VmRow] | None = None  # this host's VMs; None: the VM service has none
    web_refusals: Mapping[str, int] = field(default_factory=dict)
    usage: Sequence[VmUsage] = ()  # this host's VMs' last sampled figures


class MeshCollector(Collector):
    """A ``prometheus_client`` collector over one ``Figures``."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        yield from self._node()
        yield from self._vm_usage()
        yield from published(self.figures.status.figures)
        yield from self._members()

    def _node(self) -> Iterator[Metric]:
        f, s = self.figures, self.figures.status
        info = InfoMetricFamily("vmmesh_node", "This host: its node id, name and mesh.")
        info.add_metric(
            [],
            {
                "node_id": s.node_id,
                "name": s.name,
                "mesh_id": s.mesh_id,
                "admin": "true" if s.admin else "false",
            },
        )
        yield info
        yield GaugeMetricFamily(
            "vmmesh_node_start_time_seconds",
            "When this host's node started (unix time).",
            value=round(f.now - s.uptime, 3),
        )
        yield GaugeMetricFamily(
            "vmmesh_crl_number", "The number of the newest mesh CRL this host holds.", s.crl_number
        )
        refusals = CounterMetricFamily(
            "vmmesh_refusals",
            "What this host refused from peers, by cause (as `vmmesh status` shows).",
            labels=["cause"],
        )
        for cause, n in sorted(s.refusals.items()):
            refusals.add_metric([cause], n)
        yield refusals
        web = CounterMetricFamily(
            "vmmesh_web_refusals",
            "Connections and requests this page refused (tls: no or a foreign certificate; "
            "role: a certificate whose role does not allow the page).",
            labels=["cause"],
        )
        for cause, n in sorted(f.web_refusals.items()):
            web.add_metric([cause], n)
        yield web
        if f.vms is not None:
            by_state = GaugeMetricFamily(
                "vmmesh_vms", "VMs of this host by state.", labels=["state"]
            )
            for state, n in sorted(Counter(vm.state for vm in f.vms).items()):
                by_state.add_metric([state], n)
            yield by_state

    def _vm_usage(self) -> Iterator[Metric]:
        """This host's VMs, labelled by host and VM (see ``vmstats`` for the sources; no
        network bytes: user-mode networking has no counters to read)."""
        f = self.figures
        host = f.status.name
        labels = ["host", "vm"]

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"vmmesh_vm_{name}", doc, labels=labels)

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"vmmesh_vm_{name}", doc, labels=labels)

        cpu = counter("cpu_seconds", "CPU time of the VM's QEMU process.")
        rss = gauge("resident_memory_bytes", "Resident memory of the VM's QEMU process.")
        memory = gauge("memory_bytes", "Memory the VM was given.")
        vcpus = gauge("vcpus", "Virtual CPUs the VM was given.")
        rd = counter("disk_read_bytes", "Bytes the VM read from its disks.")
        wr = counter("disk_written_bytes", "Bytes the VM wrote to its disks.")
        rops = counter("disk_reads", "Read operations on the VM's disks.")
        wops = counter("disk_writes", "Write operations on the VM's disks.")
        for u in sorted(f.usage, key=lambda u: u.vm):
            who = [host, u.vm]
            cpu.add_metric(who, round(u.cpu_seconds, 2))
            rss.add_metric(who, u.rss_bytes)
            rd.add_metric(who, u.read_bytes)
            wr.add_metric(who, u.written_bytes)
            rops.add_metric(who, u.read_ops)
            wops.add_metric(who, u.write_ops)
        for vm in sorted(f.vms or (), key=lambda v: v.name):
            if vm.memory_mb:
                memory.add_metric([host, vm.name], vm.memory_mb * MB)
            vcpus.add_metric([host, vm.name], vm.vcpus)
        yield from (cpu, rss, memory, vcpus, rd, wr, rops, wops)

    def _members(self) -> Iterator[Metric]:
        labels = ["member", "member_id"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"vmmesh_member_{name}", doc, labels=labels)

        info = InfoMetricFamily(
            "vmmesh_member",
            "A host of the mesh as this host's gossip knows it.",
            labels=[*labels, "address"],
        )
        status = GaugeMetricFamily(
            "vmmesh_member_status",
            "1 for the state a host is in (up, suspect, down, draining), 0 for the others.",
            labels=[*labels, "status"],
        )
        cores = gauge("cores", "CPU cores of a host.")
        memory = gauge("memory_bytes", "Memory of a host.")
        quota = gauge("storage_quota_bytes", "Storage quota of a host for VMs and templates.")
        free = gauge("storage_free_bytes", "Storage still free in a host's quota.")
        slots = gauge("free_slots", "How many more VMs a host can take now.")
        vms = gauge("vms", "VMs a host runs, as it gossips them.")
        templates = gauge("templates", "Templates a host holds.")
        warm = gauge("warm_templates", "Templates a host holds with a saved warm boot.")
        heard = gauge(
            "last_heard_timestamp_seconds", "When this host last heard from a host (unix time)."
        )
        for h in sorted(self.figures.hosts, key=lambda h: (h.name, h.node_id)):
            who = [h.name, h.node_id]
            info.add_metric(who, {"address": h.address})
            state = member_state(h)
            for s in STATES:
                status.add_metric([*who, s], 1.0 if s == state else 0.0)
            cap = h.capacity
            cores.add_metric(who, cap.cores)
            memory.add_metric(who, cap.memory_mb * MB)
            quota.add_metric(who, cap.storage_quota_mb * MB)
            free.add_metric(who, cap.storage_free_mb * MB)
            slots.add_metric(who, cap.free_slots)
            vms.add_metric(who, len(h.vms))
            templates.add_metric(who, len(h.templates))
            warm.add_metric(who, sum(1 for t in h.templates if t.warm))
            if h.last_heard:
                heard.add_metric(who, round(h.last_heard, 3))
        yield from (info, status, cores, memory, quota, free, slots, vms, templates, warm, heard)
        yield from self._work()

    def _work(self) -> Iterator[Metric]:
        """Every host's work under way as it gossips it (at most 32 items a host): what
        the page's bars show, for alerts on a stuck migration or a failing bag."""
        labels = ["member", "kind", "name", "peer"]
        fraction = GaugeMetricFamily(
            "vmmesh_member_work_fraction",
            "How far a host's work under way is (0 to 1), as it gossips it.",
            labels=labels,
        )
        done = GaugeMetricFamily(
            "vmmesh_member_work_done",
            "Work done: bytes of a fetch or a migration, commands of a job.",
            labels=labels,
        )
        total = GaugeMetricFamily(
            "vmmesh_member_work_size",
            "Work in all: bytes of a fetch or a migration, commands of a job (0: not known).",
            labels=labels,
        )
        rate = GaugeMetricFamily(
            "vmmesh_member_work_rate_bytes_per_second",
            "The rate of a fetch or a migration, as its host rounds it.",
            labels=labels,
        )
        for h in sorted(self.figures.hosts, key=lambda h: (h.name, h.node_id)):
            if h.status == "down":
                continue
            seen: set[tuple[str, str, str]] = set()
            for w in h.work:
                key = (w.kind.value, w.name, w.peer)
                if key in seen:  # a sample's labels are its identity: one each
                    continue
                seen.add(key)
                who = [h.name, *key]
                if w.fraction is not None:
                    fraction.add_metric(who, w.fraction)
                done.add_metric(who, w.done)
                total.add_metric(who, w.total)
                if w.rate:
                    rate.add_metric(who, w.rate)
        yield from (fraction, done, total, rate)


def published(figures: Sequence[Figure]) -> Iterator[Metric]:
    """The extensions' figures (``NodeExtension.figures``, from the status reply), one
    family per name in the order they came, ``vmmesh_`` before each name."""
    families: dict[str, tuple[CounterMetricFamily | GaugeMetricFamily, list[str]]] = {}
    for f in figures:
        names = sorted(f.labels)
        if f.name not in families:
            make = CounterMetricFamily if f.kind is Kind.COUNTER else GaugeMetricFamily
            families[f.name] = (make(f"vmmesh_{f.name}", f.help, labels=names), names)
        family, labels = families[f.name]
        if names == labels:  # one family, one set of label names: another is dropped
            family.add_metric([f.labels[k] for k in labels], f.value)
    yield from (family for family, _ in families.values())


def render(figures: Figures) -> bytes:
    """The Prometheus text exposition of ``figures``."""
    return generate_latest(MeshCollector(figures))


def sd_targets(hosts: Sequence[HostView], mesh_id: str, web_port_offset: int) -> bytes:
    """Prometheus HTTP service discovery: every up (or draining) host's page, as JSON.

    A host's page is at its gossiped peer address and the port it gossips
    for its page (``web``); a host that gossips 0 has no page and is left
    out.  A host of an older version gossips no port: its page is guessed
    as its peer port moved by ``web_port_offset`` (this host's web port
    minus its peer port; ``web_port`` unset = peer port + 2 on every host).
    """
    groups = []
    for h in sorted(hosts, key=lambda h: (h.name, h.node_id)):
        if h.status != "up" or not h.address:
            continue
        host, _, port = h.address.rpartition(":")
        if not host or not port.isdigit():
            continue
        if h.web_port == 0:
            continue  # its page is off
        page = h.web_port if h.web_port is not None else int(port) + web_port_offset
        groups.append(
            {
                "targets": [f"{host}:{page}"],
                "labels": {
                    "__meta_vmmesh_member": h.name,
                    "__meta_vmmesh_member_id": h.node_id,
                    "__meta_vmmesh_mesh_id": mesh_id,
                },
            }
        )
    return json.dumps(groups, indent=1).encode()
