"""Node configuration, layered: defaults -> TOML file -> environment -> flags.

The TOML file is ``--config PATH``, else ``$VMMESH_CONFIG``, else
``<data_dir>/config.toml`` if it exists, else ``/etc/vmmesh/config.toml``.
Environment variables are ``VMMESH_<FIELD>`` in upper case (lists are
comma-separated).  Flags given on the command line win.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vmmesh.errors import ConfigError

DEFAULT_DATA_DIR = Path("/var/lib/vmmesh")
DEFAULT_PORT = 7400
SYSTEM_CONFIG = Path("/etc/vmmesh/config.toml")
SWIM_PROFILES = ("lan", "wan")  # the names of ``gossip.swim.PROFILES``


@dataclass(frozen=True)
class Config:
    data_dir: Path = DEFAULT_DATA_DIR
    name: str = ""  # human host name; default: the machine's hostname
    listen: str = "0.0.0.0"  # address the peer listener binds
    advertise: tuple[str, ...] = ()  # addresses to advertise; default: all non-loopback
    port: int = DEFAULT_PORT  # peer port (mutual TLS); the join port is port + 1
    peers: tuple[str, ...] = ()  # static seeds "ADDR:PORT" for networks without multicast
    mdns: bool = True
    gossip_interval: float = 0.5
    gossip_fanout: int = 3
    # swim: probes and news only, as datagrams over the peer links (issue 19);
    # scuttlebutt: the earlier protocol, every exchange carries every host's heartbeat
    # (gossip_interval and gossip_fanout tune it; SWIM has its own timers)
    gossip: str = "swim"
    swim_profile: str = "lan"  # lan | wan: SWIM's timing (probes, suspicion, repair)
    storage_quota_mb: int = 20_000
    cpu_overcommit: float = 2.0
    memory_reserve_mb: int = 512
    vm_vcpus: int = 1
    vm_memory_mb: int = 512
    vm_disk_allowance_mb: int = 1024
    accel: str = "auto"  # auto | kvm | tcg
    apt_sources: tuple[str, ...] = ()  # guest apt lines; empty: the image's own
    image_autofetch: bool = True  # no base image here: get the mesh's from peers
    warm_start: bool = True  # VMs resume from their template's saved boot where it fits
    # ... and the next VM of the latest warm request's template waits resumed and paused
    # (one per host, in a slot it gives up to any request): a warm request in ~0.1 s
    warm_spare: bool = True
    pack_level: int = 19  # zstd level of the packs templates are served from; 0: none
    job_lease: float = 60.0  # a job VM whose owner is silent this long is shut down
    drain_on_stop: bool = False  # SIGTERM: move this host's VMs away before the node ends
    # The HTTPS page, /metrics and /sd (vmmesh.web): 0 is port + 2, -1 turns it off.
    web_port: int = 0
    # `vmmesh ssh`: each VM's port 22 is forwarded from a host port of this range,
    # listening on ssh_bind (0.0.0.0: reachable from the mesh's other hosts;
    # 127.0.0.1: only from this host).  ssh_port_count = 0 turns forwards off.
    ssh_bind: str = "0.0.0.0"
    ssh_port_first: int = 22000
    ssh_port_count: int = 1000
    log_level: str = "INFO"

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "node.sock"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def join_port(self) -> int:
        return self.port + 1

    @property
    def web_listen_port(self) -> int | None:
        """The web page's port (``web_port``, by default ``port + 2``); None: no page."""
        if self.web_port < 0:
            return None
        return self.web_port or self.port + 2


_FIELDS = {f.name: f for f in fields(Config)}

RELOADABLE = (
    "storage_quota_mb",
    "cpu_overcommit",
    "memory_reserve_mb",
    "vm_vcpus",
    "vm_memory_mb",
    "vm_disk_allowance_mb",
    "apt_sources",
    "warm_start",
    "warm_spare",
    "log_level",
)
"""Settings a running node takes up on SIGHUP; the others need a restart."""


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML/env/flag value into the field's type, or raise ConfigError."""
    default = getattr(Config(), name)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if isinstance(default, Path):
            return Path(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if isinstance(value, list | tuple):
                return tuple(str(v) for v in value)
            raise ValueError(value)
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config {name}: bad value {value!r}") from None


def _from_mapping(source: str, data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        out[name] = _coerce(name, value)
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        raw = env.get(f"VMMESH_{name.upper()}")
        if raw is not None:
            out[name] = _coerce(name, raw)
    return out


def load_config(
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Config:
    """Build the effective config.  ``flags`` holds only what the user gave."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env_values = _from_env(env)
    flag_values = _from_mapping("flag", flags)
    data_dir = Path(flag_values.get("data_dir") or env_values.get("data_dir") or DEFAULT_DATA_DIR)
    path = config_file or (Path(env["VMMESH_CONFIG"]) if env.get("VMMESH_CONFIG") else None)
    if path is None:
        for candidate in (data_dir / "config.toml", SYSTEM_CONFIG):
            if candidate.is_file():
                path = candidate
                break
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                file_values = _from_mapping(str(path), tomllib.load(fh))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    merged = {**file_values, **env_values, **flag_values}
    cfg = dataclasses.replace(Config(), **merged)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    if not 1 <= cfg.port <= 65534:
        raise ConfigError(f"port must be 1..65534, not {cfg.port}")
    if cfg.accel not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"accel must be auto, kvm or tcg, not {cfg.accel!r}")
    if cfg.gossip not in ("scuttlebutt", "swim"):
        raise ConfigError(f"gossip must be scuttlebutt or swim, not {cfg.gossip!r}")
    if cfg.swim_profile not in SWIM_PROFILES:
        raise ConfigError(f"swim_profile must be lan or wan, not {cfg.swim_profile!r}")
    if cfg.gossip_interval <= 0 or cfg.gossip_fanout < 1:
        raise ConfigError("gossip interval must be > 0 and fanout >= 1")
    if cfg.storage_quota_mb < 0 or cfg.cpu_overcommit <= 0:
        raise ConfigError("storage quota must be >= 0 and cpu overcommit > 0")
    if not -1 <= cfg.web_port <= 65535:
        raise ConfigError(f"web_port must be -1 (off), 0 (port + 2) or a port, not {cfg.web_port}")
    if not 0 <= cfg.pack_level <= 22:
        raise ConfigError(f"pack_level must be 0 (no packs) .. 22, not {cfg.pack_level}")


__all__ = ["DEFAULT_PORT", "RELOADABLE", "SWIM_PROFILES", "Config", "load_config"]
