"""The server's configuration (:class:`ServerConfig`) and its checks, done before any worker starts."""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket
from dataclasses import dataclass, field

from hlpool import defaults
from hlpool.errors import HlpoolError


@dataclass
class ServerConfig:
    workers: int = 2
    host: str = defaults.HOST
    port: int = defaults.PORT
    snapshot_dir: str | None = None
    guests: dict[str, str] = field(default_factory=dict)  # empty: the example guests
    token: str | None = None
    insecure: bool = False
    max_body: int = defaults.MAX_BODY
    call_timeout: float = defaults.CALL_TIMEOUT
    grace: float = defaults.SHUTDOWN_GRACE
    max_pending: int = defaults.MAX_PENDING
    access_log: bool = False
    # Calls' plain requests answered by hlpool.service.fastlane (off: every request goes through aiohttp;
    # the access log turns it off too)
    fast_lane: bool = True
    # Directories whose files may be registered by path (POST /v1/snapshots {"path"}); none: by path is off.
    allow_dirs: list[str] = field(default_factory=list)
    header_timeout: float = defaults.HEADER_TIMEOUT
    body_timeout: float = defaults.BODY_TIMEOUT
    max_registrations: int = defaults.MAX_REGISTRATIONS
    # Snapshot builds (a builder process each) and the snapshot store: see hlpool.pool.builder and .store.
    build_timeout: float = defaults.BUILD_TIMEOUT
    build_memory: int = defaults.BUILD_MEMORY
    max_guest_memory: int = defaults.MAX_GUEST_MEMORY
    store_quota: int | None = defaults.STORE_QUOTA
    # HTTP front-end processes on one port (SO_REUSEPORT), each with its own pool; None: frontend_count()
    frontends: int | None = None


def check_config(config: ServerConfig) -> None:
    """Raise a one-line HlpoolError (naming the command-line option) for a value that cannot work."""
    if config.workers < 1:
        raise HlpoolError("--workers must be at least 1")
    if not 0 <= config.port <= 65535:
        raise HlpoolError(f"--port {config.port} is not a port number")
    if not config.call_timeout > 0 or not math.isfinite(config.call_timeout):
        raise HlpoolError("--call-timeout must be a positive number of seconds")
    if config.grace < 0:
        raise HlpoolError("--grace must not be negative")
    if config.max_body < 1024:
        raise HlpoolError("--max-body must be at least 1K")
    if config.max_pending < 1:
        raise HlpoolError("--max-pending must be at least 1")
    for option, value in (("--header-timeout", config.header_timeout), ("--body-timeout", config.body_timeout)):
        if not value > 0 or not math.isfinite(value):
            raise HlpoolError(f"{option} must be a positive number of seconds")
    if not config.build_timeout > 0 or not math.isfinite(config.build_timeout):
        raise HlpoolError("--build-timeout must be a positive number of seconds")
    for option, size in (("--build-memory", config.build_memory), ("--max-guest-memory", config.max_guest_memory)):
        if size < 1 << 20:
            raise HlpoolError(f"{option} must be at least 1M")
    if config.store_quota is not None and config.store_quota < 0:
        raise HlpoolError("--store-quota must not be negative")
    if config.frontends is not None and not 1 <= config.frontends <= config.workers:
        raise HlpoolError(f"--frontends must be between 1 and --workers ({config.workers}): each front end has "
                          f"its own workers")
    if config.max_registrations < 1:
        raise HlpoolError("max_registrations must be at least 1")
    for directory in config.allow_dirs:
        if not os.path.isabs(directory) or not os.path.isdir(directory):
            raise HlpoolError(f"--allow-dir {directory}: not an absolute path of a directory")
    if not config.token and not config.insecure and not is_loopback(config.host):
        raise HlpoolError(f"refusing to listen on {config.host}, which is not a loopback address, without a "
                          f"token: pass --token (or set HLPOOL_TOKEN), or --insecure to serve without one")


def frontend_count(config: ServerConfig) -> int:
    """The number of HTTP front ends: ``config.frontends``, else half the CPUs this process may use (the
    other half for the workers: a front end costs more CPU than a worker for a trivial call, less for a
    heavy one), at least 1 and at most one per worker. On 2 CPUs: 1, the single-process server."""
    if config.frontends is not None:
        return config.frontends
    return max(1, min(config.workers, len(os.sched_getaffinity(0)) // 2))


def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_port_free(host: str, port: int) -> None:
    """Fail fast (before starting workers) if the address cannot be bound."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise HlpoolError(f"cannot listen on {host}:{port}: {exc}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as exc:
                hint = " (is another server running?)" if exc.errno == errno.EADDRINUSE else ""
                raise HlpoolError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
