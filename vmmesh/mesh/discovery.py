"""Zero-configuration peer discovery over mDNS/DNS-SD, and static seeds.

Theory of operation
-------------------
Every node advertises one DNS-SD service instance of type ``_vmmesh._tcp.local.``
whose instance label is its node id and whose TXT record carries ``v`` (record
version), ``id`` (node id), ``mesh`` (mesh id), ``port`` and ``name`` (host
name).  It also browses the same type.  What a browse returns is untrusted LAN
input: anybody can multicast anything, so a record only becomes a `PeerSeen`
after `parse_txt` has checked every field, and only if it belongs to our mesh
and is not our own.  Discovery only says "there may be a peer at this address";
the mutual-TLS handshake decides whether it really is one.

The decision part is `DiscoveryCore`: plain methods, no sockets, no threads
(``service_added(...) -> PeerEvent | None``), tested synchronously.  It
remembers which instance names it reported, so that a removal of a record we
ignored (another mesh, garbage) produces no `PeerGone`, and it logs a bad
record once at WARNING and then at DEBUG, so that a chatty broken device on
the LAN cannot flood the log.

python-zeroconf is asyncio inside; its synchronous API runs that loop in a
thread of its own and calls browser handlers on yet another thread.  This is
the only module that imports it.  `run_discovery` is the thin trio glue: it
does the blocking zeroconf calls in ``trio.to_thread``, and the browser thread
hands events to trio with ``trio.from_thread.run_sync`` and ``send_nowait`` —
the zeroconf thread is never blocked on a full channel; if the consumer lags
behind a large buffer, an event is dropped (and logged), which is harmless
because mDNS re-announces and gossip repairs the view anyway.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from vmmesh.api.names import check_hex_id
from vmmesh.errors import ConfigError, MalformedMessage, UsageError
from vmmesh.net.addresses import local_addresses
from vmmesh.net.refusals import Cause, Refusals, describe

log = logging.getLogger(__name__)

SERVICE_TYPE = "_vmmesh._tcp.local."
TXT_VERSION = 1
MAX_NAME = 63  # one DNS label; also what we accept as a host name from TXT
_CLOSE_TIMEOUT = 5.0
_INFO_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class PeerSeen:
    """A node of our mesh advertises itself at ``addresses``:``port``."""

    node_id: str
    mesh_id: str
    name: str
    addresses: tuple[str, ...]
    port: int


@dataclass(frozen=True)
class PeerGone:
    """A node of our mesh withdrew its record (goodbye packet or TTL expiry)."""

    node_id: str


PeerEvent = PeerSeen | PeerGone


@dataclass(frozen=True)
class Advert:
    """The validated content of one TXT record."""

    version: int
    node_id: str
    mesh_id: str
    name: str
    port: int


def instance_label(node_id: str) -> str:
    """The DNS-SD instance label for ``node_id``.

    A DNS label holds at most 63 bytes while node ids may be up to 64 hex
    digits; the TXT ``id`` is authoritative, the label only has to be unique.
    """
    return node_id[:MAX_NAME]


def txt_properties(*, node_id: str, mesh_id: str, name: str, port: int) -> dict[str, str]:
    """The TXT record we advertise (checked, so we never send what we would reject)."""
    check_hex_id(node_id, "node id")
    check_hex_id(mesh_id, "mesh id")
    _check_port(port)
    return {
        "v": str(TXT_VERSION),
        "id": node_id,
        "mesh": mesh_id,
        "port": str(port),
        "name": _clean_name(name),
    }


def parse_txt(props: Mapping[Any, Any]) -> Advert:
    """Validate a TXT record as zeroconf hands it over (bytes keys and values).

    Raises MalformedMessage for anything we did not write ourselves: missing or
    extra-long fields, a non-hex id, a port out of range, a newer record
    version we cannot read.
    """
    fields: dict[str, str] = {}
    for key, value in props.items():
        k = _text(key, "TXT key")
        if value is None:
            continue
        fields[k] = _text(value, f"TXT value {k!r:.20}")
    try:
        version = int(fields["v"])
    except (KeyError, ValueError):
        raise MalformedMessage(f"bad TXT version: {fields.get('v')!r:.20}") from None
    if version != TXT_VERSION:
        raise MalformedMessage(f"unsupported TXT version {version}")
    port_text = fields.get("port", "")
    if not port_text.isdigit():
        raise MalformedMessage(f"bad port: {port_text!r:.20}")
    port = int(port_text)
    _check_port(port, MalformedMessage)
    name = fields.get("name", "")
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise MalformedMessage(f"bad host name: {name!r:.80}")
    return Advert(
        version=version,
        node_id=check_hex_id(fields.get("id"), "node id"),
        mesh_id=check_hex_id(fields.get("mesh"), "mesh id"),
        name=name,
        port=port,
    )


def parse_seed(seed: str) -> tuple[str, int]:
    """Split a static seed ``ADDR:PORT`` (or ``[V6ADDR]:PORT``) into (host, port).

    Seeds serve networks without multicast; the message says what is expected
    because a user typed it.
    """
    text = seed.strip()
    expected = "expected ADDR:PORT, e.g. 192.168.1.20:7400 or [fe80::1%eth0]:7400"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"bad peer {seed!r}: {expected}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise UsageError(f"bad peer {seed!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise UsageError(f"bad peer {seed!r}: {expected}")
        if ":" in host:
            raise UsageError(f"bad peer {seed!r}: write an IPv6 address as [ADDR]:PORT")
    if not port_text.isdigit():
        raise UsageError(f"bad peer {seed!r}: port {port_text!r} is not a number")
    port = int(port_text)
    _check_port(port, UsageError)
    return host, port


def gossiped_endpoint(
    node_id: str, addrs: Sequence[str], held_source: str | None
) -> tuple[str, int] | None:
    """Where to dial ``node_id`` by the "addr" key it gossips, or None to keep what is held.

    Gossip is hearsay: it fills in an address the book lacks, or replaces one
    gossip gave before, never one seen on the network (mDNS, a seed, an inbound
    connection; ``held_source`` is the held endpoint's source).  The host's first
    address is its best; one that does not parse is ignored (logged at DEBUG).
    """
    if not addrs or (held_source is not None and held_source != "gossip"):
        return None
    try:
        return parse_seed(addrs[0])
    except UsageError:
        log.debug("host %s gossips a bad address %r", node_id, addrs[0])
        return None


class DiscoveryCore:
    """Turns raw browse results into PeerSeen/PeerGone for one node (no I/O)."""

    def __init__(self, *, node_id: str, mesh_id: str, refusals: Refusals | None = None) -> None:
        self.node_id = node_id
        self.mesh_id = mesh_id
        self._known: dict[str, str] = {}  # instance name -> node id we reported
        self._refusals = refusals or Refusals(log)

    def service_added(
        self, instance: str, props: Mapping[Any, Any] | None, addresses: list[str], port: int
    ) -> PeerEvent | None:
        """A record appeared or changed.  Returns the event to forward, if any."""
        try:
            if props is None:
                raise MalformedMessage("no TXT record")
            advert = parse_txt(props)
            if instance.split(".", 1)[0] != instance_label(advert.node_id):
                raise MalformedMessage(f"instance name does not match id {advert.node_id}")
            if advert.port != port:
                raise MalformedMessage(f"SRV port {port} differs from TXT port {advert.port}")
            addrs = tuple(_valid_addresses(addresses))
            if not addrs:
                raise MalformedMessage("no usable address")
        except MalformedMessage as exc:
            self._refusals(
                Cause.DISCOVERY, f"mDNS record {instance[:120]!r}", describe(exc), "record"
            )
            return self.service_removed(instance)
        if advert.node_id == self.node_id or advert.mesh_id != self.mesh_id:
            return self.service_removed(instance)
        self._known[instance] = advert.node_id
        return PeerSeen(
            node_id=advert.node_id,
            mesh_id=advert.mesh_id,
            name=advert.name,
            addresses=addrs,
            port=advert.port,
        )

    def service_removed(self, instance: str) -> PeerEvent | None:
        """A record went away; only peers we reported get a PeerGone."""
        node_id = self._known.pop(instance, None)
        return None if node_id is None else PeerGone(node_id)


async def run_discovery(
    *,
    node_id: str,
    mesh_id: str,
    name: str,
    port: int,
    addresses: list[str],
    events: trio.MemorySendChannel[PeerEvent],
    interfaces: list[str] | None = None,
    refusals: Refusals | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Advertise this node and report peers of ``mesh_id`` until cancelled.

    ``addresses`` are what peers should dial (empty: every address of this
    machine); ``interfaces`` restricts the interfaces zeroconf binds (None:
    all).  Started (``task_status.started()``) once the record is registered
    and the browser runs.  On cancellation the record is withdrawn with a
    goodbye packet, so peers see PeerGone at once instead of at TTL expiry.

    Raises UsageError when another host already advertises ``node_id`` (a
    copied data directory) and ConfigError when zeroconf cannot bind on the
    interfaces: the node may then go on with static seeds only.
    """
    props = txt_properties(node_id=node_id, mesh_id=mesh_id, name=name, port=port)
    try:
        packed = [ipaddress.ip_address(a).packed for a in addresses]
    except ValueError as exc:
        raise UsageError(f"bad advertised address: {exc}") from None
    core = DiscoveryCore(node_id=node_id, mesh_id=mesh_id, refusals=refusals)
    mdns = _Zeroconf(core, events, trio.lowlevel.current_trio_token())
    await mdns.open(interfaces)
    try:
        await trio.to_thread.run_sync(mdns.advertise, node_id, port, props, packed)
        log.info("mDNS: advertising %s on port %d, browsing %s", node_id, port, SERVICE_TYPE)
        task_status.started()
        await trio.sleep_forever()
    finally:
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await trio.to_thread.run_sync(mdns.close, abandon_on_cancel=True)


class _Zeroconf:
    """python-zeroconf behind one object: its threads hand events to trio, never block."""

    def __init__(
        self,
        core: DiscoveryCore,
        events: trio.MemorySendChannel[PeerEvent],
        token: trio.lowlevel.TrioToken,
    ) -> None:
        self._core = core
        self._events = events
        self._token = token
        self._zc: Any = None
        self._info: Any = None
        self._browser: Any = None

    async def open(self, interfaces: list[str] | None) -> None:
        from zeroconf import InterfaceChoice, Zeroconf

        choice: Any = InterfaceChoice.All if interfaces is None else interfaces
        try:
            self._zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=choice))
        except OSError as exc:
            raise ConfigError(f"mDNS cannot start ({exc}); use --no-mdns and --peer") from exc

    def advertise(
        self, node_id: str, port: int, props: dict[str, str], packed: list[bytes]
    ) -> None:
        """Register our record and start browsing (in a worker thread)."""
        from zeroconf import NonUniqueNameException, ServiceBrowser, ServiceInfo

        info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance_label(node_id)}.{SERVICE_TYPE}",
            port=port,
            properties=props,
            server=f"{instance_label(node_id)}.local.",
            addresses=packed or [ipaddress.ip_address(a).packed for a in local_addresses()],
        )
        try:
            self._zc.register_service(info)
        except NonUniqueNameException:
            raise UsageError(
                f"another host on the LAN advertises node id {node_id}: copied data directory?"
            ) from None
        self._info = info
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, self._listener())

    def _listener(self) -> Any:
        from zeroconf import ServiceListener, Zeroconf

        outer = self

        class Listener(ServiceListener):
            def add_service(self, zc: Zeroconf, type_: str, instance: str) -> None:
                info = zc.get_service_info(type_, instance, timeout=_INFO_TIMEOUT_MS)
                if info is not None:
                    addrs = info.parsed_scoped_addresses()
                    port = info.port or 0
                    outer._forward(
                        outer._core.service_added(instance, info.properties, addrs, port)
                    )

            def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
                self.add_service(zc, type_, name)

            def remove_service(self, zc: Zeroconf, type_: str, instance: str) -> None:
                outer._forward(outer._core.service_removed(instance))

        return Listener()

    def _forward(self, event: PeerEvent | None) -> None:
        """From zeroconf's thread into trio."""
        if event is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._deliver, event, trio_token=self._token)

    def _deliver(self, event: PeerEvent) -> None:
        # Runs in trio; must never block the zeroconf thread behind it.
        try:
            self._events.send_nowait(event)
        except trio.WouldBlock:
            log.warning("discovery event dropped, consumer is behind: %s", event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def close(self) -> None:
        """Withdraw our record (goodbye packet) and stop; best effort."""
        try:
            if self._browser is not None:
                self._browser.cancel()
            if self._info is not None:
                self._zc.unregister_service(self._info)
        except Exception:
            log.exception("mDNS: withdrawing our record failed")
        finally:
            self._zc.close()


def _valid_addresses(addresses: list[str]) -> list[str]:
    out = []
    for a in addresses:
        try:
            ipaddress.ip_address(a.split("%", 1)[0])
        except ValueError:
            continue
        out.append(a)
    return out


def _text(value: object, what: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedMessage(f"{what} is not UTF-8") from None
    if isinstance(value, str):
        return value
    raise MalformedMessage(f"{what} has type {type(value).__name__}")


def _clean_name(name: str) -> str:
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise UsageError(f"host name must be 1-{MAX_NAME} printable characters: {name!r:.80}")
    return name


def _check_port(port: int, exc: type[Exception] = UsageError) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise exc(f"port {port} is out of range 1-65535")
